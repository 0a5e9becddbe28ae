"""seqio registrations of the evaluation tasks, beside the training ones
(`data/seqio_tasks.py`).

Every family's `EVAL_TASKS` entry becomes `seqio.get_mixture_or_task("eval:<name>")`:
the `validation` split of its catalog source (filtered like the runner filters it) with the
task's metric functions (`metric_fns`, called as fn(targets, predictions) on texts). As for
training, the runner executes the same declarations without TensorFlow (`tasks.run`); this
is the declarative view for seqio tooling. Importing it imports TensorFlow.
"""
import seqio

from vlm_jax.data import catalog, families
from vlm_jax.data import seqio_tasks as data_tasks
from vlm_jax.evaluation import tasks as eval_tasks

PREFIX = "eval:"


def seqio_name(name: str) -> str:
  return PREFIX + name


def register(family: str):
  module = families.load(family)
  specs = catalog.tasks(module)
  for task in getattr(module, "EVAL_TASKS", ()):
    if seqio_name(task.name) in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        seqio_name(task.name),
        source=seqio.FunctionDataSource(data_tasks.DatasetFn(specs[task.source], task.keep),
                                        splits=("validation",)),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=data_tasks.output_features(),
        metric_fns=eval_tasks.metric_fns(task, families.box_format(family)))


def register_all():
  """Every shipped family's evaluation tasks."""
  for family in families.available():
    register(family)


register_all()
