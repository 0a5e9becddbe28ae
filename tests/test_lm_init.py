"""A random-init decoder LM starts near the uniform-prediction loss ln(vocab), tied or not
(tied N(0, 1) rows gave logits with standard deviation sqrt(width): a loss in the hundreds)."""
import math

import jax
import jax.numpy as jnp
import optax
import pytest

from vlm_jax.nn import decoder_lm

VOCAB = 1024


@pytest.mark.parametrize("tie,norm,width", [(True, "layernorm", 512), (False, "rmsnorm", 256)])
def test_random_init_loss_is_near_log_vocab(tie, norm, width):
  lm = decoder_lm.DecoderLM(vocab_size=VOCAB, width=width, num_layers=2, num_heads=4,
                            mlp_dim=2 * width, tie_embeddings=tie, norm_type=norm,
                            mlp_activation="gelu")
  tokens = jax.random.randint(jax.random.key(0), (4, 64), 0, VOCAB)
  params = lm.init(jax.random.key(1), tokens)
  logits = lm.apply(params, tokens)
  loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:])))
  assert math.log(VOCAB) - 0.2 < loss < math.log(VOCAB) + 1.5, loss
