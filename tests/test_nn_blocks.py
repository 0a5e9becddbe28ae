"""Norms, MLP variants, embeddings, conv stem, ViT."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.nn import conv_stem, embeddings, mlp, norms, vit


def test_layernorm_and_rmsnorm_normalise():
  x = jax.random.normal(jax.random.key(0), (3, 4, 32)) * 5 + 2
  ln = norms.LayerNorm()
  y = ln.apply(ln.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-3)
  rms = norms.RMSNorm()
  y = rms.apply(rms.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y ** 2, -1)), 1.0, rtol=1e-3)
  with pytest.raises(ValueError, match="norm_type"):
    norms.make_norm("batchnorm")


@pytest.mark.parametrize("activation,expected", [
    ("gelu", {"wi", "wo"}), ("quick_gelu", {"wi", "wo"}), ("squared_relu", {"wi", "wo"}),
    ("swiglu", {"wi", "wi_gate", "wo"})])
def test_mlp_variants(activation, expected):
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  block = mlp.Mlp(16, activation)
  params = block.init(jax.random.key(0), x)["params"]
  assert set(params) == expected
  assert block.apply({"params": params}, x).shape == x.shape
  with pytest.raises(ValueError, match="activation"):
    mlp.Mlp(16, "tanh").init(jax.random.key(0), x)


def test_squared_relu_is_zero_for_negative_preactivations():
  block = mlp.Mlp(4, "squared_relu", use_bias=False)
  x = jnp.ones((1, 1, 2))
  params = nn.unbox(block.init(jax.random.key(0), x)["params"])
  params["wi"]["kernel"] = -jnp.abs(params["wi"]["kernel"])
  np.testing.assert_array_equal(block.apply({"params": params}, x), 0.0)


def test_embed_attend_is_the_transposed_table():
  emb = embeddings.Embed(11, 8)
  ids = jnp.array([[1, 2, 3]])
  variables = emb.init(jax.random.key(0), ids)
  table = nn.unbox(variables["params"])["embedding"]
  np.testing.assert_allclose(emb.apply(variables, ids), table[ids[0]][None])
  x = jax.random.normal(jax.random.key(1), (1, 3, 8))
  np.testing.assert_allclose(emb.apply(variables, x, method="attend"), x @ table.T, rtol=1e-5)


def test_resize_2d_pos_embedding():
  grid = jax.random.normal(jax.random.key(0), (4, 4, 8))
  assert embeddings.resize_2d_pos_embedding(grid, (4, 4)) is grid
  resized = embeddings.resize_2d_pos_embedding(grid, (8, 6))
  assert resized.shape == (8, 6, 8)
  constant = jnp.ones((4, 4, 8))
  np.testing.assert_allclose(embeddings.resize_2d_pos_embedding(constant, (7, 7)), 1.0,
                             rtol=1e-6)


def test_conv_stem_stride_16_and_examples_independent():
  stem = conv_stem.ConvStem(out_features=24, width=8, stage_blocks=(1, 2, 1))
  abstract = jax.eval_shape(stem.init_with_output, jax.random.key(1), jnp.zeros((1, 224, 224, 3)))
  assert abstract[0].shape == (1, 14, 14, 24)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = jax.jit(stem.init)(jax.random.key(1), images)
  apply = jax.jit(stem.apply)
  out = apply(variables, images)
  assert out.shape == (2, 4, 4, 24)
  assert "batch_stats" not in variables  # GroupNorm: no mutable state
  names = set(nn.unbox(variables["params"]))
  assert {"root_conv", "root_norm", "stage1_block1", "stage2_block2", "stage3_block1",
          "projection"} <= names
  other = images.at[1].set(jax.random.normal(jax.random.key(5), (64, 64, 3)))
  np.testing.assert_allclose(apply(variables, other)[0], out[0], rtol=1e-5, atol=1e-5)


def test_weight_standardisation_makes_conv_scale_invariant():
  conv = conv_stem.StdConv(4, 3)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  params = nn.unbox(conv.init(jax.random.key(1), x)["params"])
  scaled = {"kernel": params["kernel"] * 7.0 + 0.0}
  np.testing.assert_allclose(conv.apply({"params": params}, x),
                             conv.apply({"params": scaled}, x), rtol=1e-4, atol=1e-4)


def test_vit_shapes_and_clip_layout():
  model = vit.ViT(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, class_token=True,
                  pre_norm=True, patch_bias=False, mlp_activation="quick_gelu")
  images = jnp.zeros((2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  assert jax.jit(model.apply)(variables, images).shape == (2, 1 + 16, 32)
  params = nn.unbox(variables["params"])
  assert params["patch_embedding"]["kernel"].shape == (8, 8, 3, 32)
  assert "bias" not in params["patch_embedding"]
  assert params["pos_embedding"]["pos_embedding"].shape == (17, 32)
  assert params["encoder"]["layers"]["mlp"]["wi"]["kernel"].shape == (2, 32, 64)


def test_gelu_matches_the_exact_gelu_and_its_derivative():
  x = jnp.linspace(-10.0, 10.0, 20001)
  exact = lambda v: jax.nn.gelu(v, approximate=False)
  np.testing.assert_allclose(mlp.gelu(x), exact(x), rtol=1e-6, atol=1e-6)
  grad = lambda f: jax.vmap(jax.grad(f))(x)
  np.testing.assert_allclose(grad(mlp.gelu), grad(exact), rtol=1e-5, atol=1e-6)
  jitted = jax.jit(jax.vmap(jax.grad(mlp.gelu)))(x)
  np.testing.assert_allclose(jitted, grad(exact), rtol=1e-5, atol=1e-6)
