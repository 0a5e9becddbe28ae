"""What a trained captioning model generates for held-out images, beside the truth."""
import numpy as np

from vlm_jax import decode
from vlm_jax.data import pipeline
from vlm_jax.data import vocab as vocab_lib
from vlm_jax.evaluation import captions
from vlm_jax.train import state as state_lib


def generate_captions(trainer, state, num_examples: int) -> list[tuple[str, str]]:
  """[(truth, generated)] for the first `num_examples` held-out images (greedy, no prefix)."""
  config = trainer.config
  (batch, truths), = pipeline.make_eval_batches(config.data, batch_size=num_examples)
  params = state_lib.merge_params(state.params, state.frozen)
  with trainer.mesh_context():
    tokens = decode.generate(trainer.model, params, batch,
                             max_len=config.data.suffix_length).tokens
  vocab = vocab_lib.Vocab(config.data.vocab_path)
  return [(truth, vocab.decode(row)) for truth, row in zip(truths, np.asarray(tokens))]


def show_generations(trainer, state, num_examples: int) -> None:
  pairs = generate_captions(trainer, state, num_examples)
  width = max(len(t) for t, _ in pairs)
  print(f"\nCaptions for {len(pairs)} held-out images (greedy, image only):")
  print(f"  {'truth':<{width}}   generated")
  for truth, generated in pairs:
    mark = "=" if truth == generated else " "
    print(f"  {truth:<{width}} {mark} {generated}")
  exact = sum(t == g for t, g in pairs)
  truths, generated = [t for t, _ in pairs], [g for _, g in pairs]
  cider = captions.cider(generated, [[t] for t in truths])
  print(f"exact match: {exact}/{len(pairs)}; CIDEr-D {cider:.3f} (idf over these "
        f"{len(pairs)} images; `vlm-eval` reports it on the held-out tasks)")
