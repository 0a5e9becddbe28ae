"""seqio registrations of the evaluation tasks, beside the training ones (`data/tasks.py`).

Every `evaluation.tasks.TASKS` entry becomes `seqio.get_mixture_or_task("eval:<name>")`:
the `validation` split of its catalog source (filtered like the runner filters it) with the
task's metric functions (`metric_fns`, called as fn(targets, predictions) on texts). As for
training, the runner executes the same declarations without TensorFlow (`tasks.run`); this
is the declarative view for seqio tooling. Importing it imports TensorFlow.
"""
import seqio

from vlm_jax.data import catalog, pipeline
from vlm_jax.data import tasks as data_tasks
from vlm_jax.evaluation import tasks as eval_tasks

PREFIX = "eval:"


def seqio_name(name: str) -> str:
  return PREFIX + name


def register_all():
  for name, task in eval_tasks.TASKS.items():
    if seqio_name(name) in seqio.TaskRegistry.names():
      continue
    pipeline.converter(task.converter)  # imports the family's data module and its sources
    seqio.TaskRegistry.add(
        seqio_name(name),
        source=seqio.FunctionDataSource(
            data_tasks.DatasetFn(catalog.TASKS[task.source], task.keep),
            splits=("validation",)),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=data_tasks.output_features(),
        metric_fns=eval_tasks.metric_fns(task))


register_all()
