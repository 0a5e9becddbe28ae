"""Bad configs fail before anything is compiled, with one line naming the field and the fix."""
import os

import jax
import pytest

from test_train import REPO, tiny_config
from vlm_jax import config as config_lib
from vlm_jax.cli import train as train_cli
from vlm_jax.train import loop

MINIGPT = os.path.join(REPO, "configs", "minigpt_v2.py") + ":tiny"

# (config, overrides, the start of the message, the fix it proposes); 8 simulated devices.
CASES = {
    "batch": (None, {"batch_size": "12"},
              "config.batch_size=12 is not divisible by the mesh's batch axes ('data', 'fsdp') "
              "(8 ways", "--config.batch_size=8."),
    "mesh": (None, {"mesh.shape": "(3, 1, 1)"},
             "config.mesh.shape=(3, 1, 1) needs 3 devices but 8 are available",
             "Set --config.mesh.shape so its product is 8"),
    "model": (None, {"model.name": "simvlm_xl"},
              "config.model.name='simvlm_xl': family 'simvlm_xl': neither "
              "vlm_jax.models.simvlm_xl nor simvlm_xl.model", "can be imported"),
    "patch": (MINIGPT, {"data.image_size": "100"},
              "config.data.image_size=100 is not a multiple of "
              "config.model.vision.patch_size=14", "use 98 or 112."),
}


@pytest.fixture
def compilations():
  """Names of the XLA programs compiled while the test runs (cache hits included)."""
  names = []
  listener = lambda event, duration, **kw: names.append(kw.get("fun_name", "?")) if (
      event == "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield names
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_one_line_naming_the_field_and_fix_before_compiling(case, tmp_path,
                                                                          compilations):
  spec, overrides, message, fix = CASES[case]
  config = (config_lib.load_config(spec, list(overrides.items())) if spec
            else tiny_config(**overrides))
  with pytest.raises(config_lib.ConfigError) as error:
    loop.Trainer(config, str(tmp_path))
  text = str(error.value)
  assert text.startswith(message) and fix in text and "\n" not in text, text
  assert compilations == []


def test_frozen_regex_matching_nothing_is_one_line_before_compiling(tmp_path):
  config = tiny_config()
  config.frozen = ("encoder/no_such_layer/.*",)
  with pytest.raises(config_lib.ConfigError) as error:
    loop.Trainer(config, str(tmp_path))
  text = str(error.value)
  assert text.startswith("config.frozen: pattern(s) ['encoder/no_such_layer/.*'] match no "
                         "parameter; fix or remove them (parameter paths look like ["), text
  assert "\n" not in text


def test_vlm_train_prints_one_line_and_exits_2(tmp_path, capsys):
  argv = ["--config", os.path.join(REPO, "configs", "simvlm.py") + ":tiny",
          "--workdir", str(tmp_path), "--config.batch_size=12", "--num-samples=0"]
  with pytest.raises(SystemExit) as exit_info:
    train_cli.main(argv)
  assert exit_info.value.code == train_cli.EXIT_CONFIG == 2
  err = capsys.readouterr().err
  assert err.startswith("vlm-train: error: config.batch_size=12 is not divisible") and \
      err.count("\n") == 1, err


def test_an_init_from_without_a_checkpoint_exits_2_in_one_line(tmp_path, capsys):
  argv = ["--config", os.path.join(REPO, "configs", "simvlm.py") + ":tiny",
          "--workdir", str(tmp_path / "run"), f"--config.init_from={tmp_path / 'nowhere'}",
          "--num-samples=0"]
  with pytest.raises(SystemExit) as exit_info:
    train_cli.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("vlm-train: error: config.init_from: ") and "nowhere" in err and \
      err.count("\n") == 1, err
