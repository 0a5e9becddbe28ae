"""Imported weights as a run: `vlm-convert import ... --config C --workdir RUN` writes RUN's
step-0 checkpoint (a whole train state: the imported parameters, split by config.frozen, a
fresh optimizer state and the data iterator at its start). Then `vlm-eval --config C
--workdir RUN` evaluates the imported model, `vlm-train --config C --workdir RUN` continues
training it, and `--config.init_from=RUN` starts another run from it."""
from vlm_jax import params as params_lib
from vlm_jax.train import loop


class ImportedRunError(ValueError):
  """The workdir already holds a run."""


def save(config, workdir: str, loaded: dict, log=print) -> None:
  """Writes `loaded` ('/'-path -> array for every parameter of config's model) as `workdir`'s
  step 0."""
  trainer = loop.Trainer(config, workdir)
  try:
    steps = trainer.checkpointer.manager.all_steps()
    if steps:
      raise ImportedRunError(f"--workdir {workdir} already holds checkpoints (steps "
                             f"{list(steps)}); import into a new directory.")
    wanted = params_lib.flatten(trainer.factory.abstract_params)
    missing = sorted(set(wanted) - set(loaded))
    if missing:
      raise ImportedRunError(f"the import lacks {len(missing)} parameter(s) of the config's "
                             f"model, e.g. {missing[:3]}")
    with trainer.mesh_context():
      state = trainer.factory.create_with_params(params_lib.unflatten(
          {path: loaded[path] for path in wanted}))
      trainer.checkpointer.save(0, state, trainer.data, force=True)
      trainer.checkpointer.wait()
  finally:
    trainer.checkpointer.close()
  log(f"Saved the imported parameters as step 0 of a run in {workdir} (vlm-eval / vlm-train "
      "--workdir read it).")
