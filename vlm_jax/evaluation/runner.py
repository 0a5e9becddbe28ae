"""Running evaluation tasks on a trainer's state: from the training loop (config.evals) and
from `vlm-eval`. Scalars are named eval/<task>/<metric> for the metric writers."""
import time

from vlm_jax import params as params_lib
from vlm_jax.evaluation import tasks as tasks_lib


def task_names(config, requested=()) -> list[str]:
  names = list(requested) or tasks_lib.tasks_for(config)
  for name in names:
    tasks_lib.get(name, config)  # clear error for an unknown task
  return names


def evaluate(trainer, state, names, *, num_examples: int = 0, batch_size: int = 8):
  """({eval/<task>/<metric>: value}, {task: [(truth, generated)]}) for the given tasks."""
  params = params_lib.merge_params(state.params, state.frozen)
  scalars, samples = {}, {}
  for name in names:
    start = time.perf_counter()
    with trainer.mesh_context():
      metrics, pairs = tasks_lib.run(tasks_lib.get(name, trainer.config), trainer.model,
                                     params, trainer.config, num_examples=num_examples or None,
                                     batch_size=batch_size)
    scalars.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
    scalars[f"eval/{name}/seconds"] = time.perf_counter() - start
    samples[name] = pairs
  return scalars, samples


def evaluate_benchmark(trainer, state, name: str, evaluate_fn, *args, **kwargs):
  """`evaluate`'s outputs for a benchmark file: evaluate_fn(model, params, config, *args,
  **kwargs) -> (metrics, samples), e.g. `coco.evaluate`,
  `family_benchmarks.evaluate_vqa`."""
  params = params_lib.merge_params(state.params, state.frozen)
  start = time.perf_counter()
  with trainer.mesh_context():
    metrics, pairs = evaluate_fn(trainer.model, params, trainer.config, *args, **kwargs)
  scalars = {f"eval/{name}/{k}": v for k, v in metrics.items()}
  scalars[f"eval/{name}/seconds"] = time.perf_counter() - start
  return scalars, {name: pairs}


def due(config, step: int) -> bool:
  every = config.evals.every_steps
  return bool(every) and step % every == 0


def run_configured(trainer, state) -> dict:
  """The training loop's hook: config.evals' tasks on the current state -> scalars."""
  evals = trainer.config.evals
  scalars, _ = evaluate(trainer, state, task_names(trainer.config, evals.tasks),
                        num_examples=evals.num_examples, batch_size=evals.batch_size)
  return scalars
