"""Config files load by `path:arg`; overrides are typed; mistakes name the field."""
import pytest

from vlm_jax import config as config_lib

CONFIG_FILE = """
from vlm_jax import config as config_lib

def get_config(arg="small"):
  c = config_lib.base_config()
  c.model.name = "demo"
  c.model.num_layers = {"small": 2, "big": 8}[arg]
  return c
"""


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / "demo.py"
  path.write_text(CONFIG_FILE)
  return str(path)


def test_size_argument_selects_the_size(config_path):
  assert config_lib.load_config(f"{config_path}:big").model.num_layers == 8
  assert config_lib.load_config(config_path).model.num_layers == 2


def test_overrides_are_parsed_by_type(config_path):
  c = config_lib.load_config(config_path, [("model.num_layers", "4"),
                                           ("optimizer.learning_rate", "3e-4"),
                                           ("model.dtype", "bfloat16"),
                                           ("mesh.shape", "(2, 2, 2)"),
                                           ("optimizer.weight_decay", "0")])
  assert c.model.num_layers == 4
  assert c.optimizer.learning_rate == 3e-4
  assert c.model.dtype == "bfloat16"
  assert c.mesh.shape == (2, 2, 2)
  assert c.optimizer.weight_decay == 0.0 and isinstance(c.optimizer.weight_decay, float)


def test_unknown_key_names_the_nearest_valid_ones(config_path):
  with pytest.raises(config_lib.ConfigError, match=r"'model.num_layer'.*model.num_layers"):
    config_lib.load_config(config_path, [("model.num_layer", "4")])


def test_wrong_type_names_the_key_and_expected_type(config_path):
  with pytest.raises(config_lib.ConfigError, match=r"'model.num_layers' expects int"):
    config_lib.load_config(config_path, [("model.num_layers", "four")])


def test_missing_file_is_named():
  with pytest.raises(config_lib.ConfigError, match="nowhere.py"):
    config_lib.load_config("nowhere.py:tiny")


def test_argv_parsing_separates_config_from_other_flags():
  spec, overrides, rest = config_lib.parse_config_args(
      ["--config", "c.py:tiny", "--config.model.num_layers=4", "--workdir", "/tmp/x",
       "--config.seed", "3"])
  assert spec == "c.py:tiny"
  assert overrides == [("model.num_layers", "4"), ("seed", "3")]
  assert rest == ["--workdir", "/tmp/x"]
