"""What a trained model generates for held-out examples, beside the truth: the config's
first generation task of `vlm_jax.evaluation.tasks` (captions for SimVLM, Prismer and
Flamingo; instructions for MiniGPT-v2; OCR for CogAgent), greedy with the KV cache."""
from vlm_jax import params as params_lib
from vlm_jax.evaluation import tasks


def generation_task(config) -> str | None:
  """Name of the config's first zero-shot generation task, or None."""
  names = [name for name, task in tasks.family_tasks(config).items()
           if task.kind == "generate" and not task.shots]
  return names[0] if names else None


def generate_captions(trainer, state, num_examples: int) -> list[tuple[str, str]]:
  """[(truth, generated)] for the first `num_examples` held-out examples of
  `generation_task` (one batch)."""
  name = generation_task(trainer.config)
  if name is None:
    raise ValueError(f"the {trainer.config.model.name!r} family has no generation task "
                     "among its EVAL_TASKS")
  params = params_lib.merge_params(state.params, state.frozen)
  with trainer.mesh_context():
    _, pairs = tasks.run(tasks.get(name, trainer.config), trainer.model, params, trainer.config,
                         num_examples=num_examples, batch_size=num_examples)
  return pairs


def show_generations(trainer, state, num_examples: int) -> None:
  pairs = generate_captions(trainer, state, num_examples)
  name = generation_task(trainer.config)
  width = max(len(t) for t, _ in pairs)
  print(f"\nGenerations for {len(pairs)} held-out examples of {name} (greedy):")
  print(f"  {'truth':<{width}}   generated")
  for truth, generated in pairs:
    mark = "=" if truth == generated else " "
    print(f"  {truth:<{width}} {mark} {generated}")
  exact = sum(t == g for t, g in pairs)
  cider = tasks.score(("cider",), [g for _, g in pairs], [t for t, _ in pairs])["cider"]
  print(f"exact match: {exact}/{len(pairs)}; CIDEr-D {cider:.3f} (idf over these "
        f"{len(pairs)} examples; `vlm-eval` reports it on every held-out task)")
