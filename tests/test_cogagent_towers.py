"""CogAgent's released vision towers, imported through `vlm-convert`'s cogagent layout, give
the outputs of torch models built from the published code (f32, within 1e-4):

  low-res   visual.py's EVA2CLIPModel: EVA2-CLIP layers that normalise each branch's output,
            then the patch tokens + pos_embed through the GLU adapter, between boi and eoi
            (our CogAgent.encode_images)
  high-res  cross_visual.py's CrossVisionModel: EVA-02 (2-D rotary, SwiGLU with sub-LN,
            q/v-only biases) run up to its last block but one, patch tokens + pos_embed
            (our CogAgent.encode_high_res)

The torch references are compact re-implementations written from the release's code as
ported in vLLM (vllm/model_executor/models/cogagent_vision_encoder.py, "adapted from
huggingface.co/zai-org/cogagent-chat-hf") and PaddleMIX (paddlemix/models/cogvlm/visual.py).
timm's `Eva` would be the independent EVA-02, but timm imports torchvision, whose wheels
here need another torch than the pinned 2.13.0+cpu.
"""
import einops
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test_convert_cogagent as files
from vlm_jax.convert import cogagent, released

LOW = dict(files.VISION, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=48,
           patch_size=4, image_size=16, num_positions=17)
CROSS_WIDTH, CROSS_BLOCKS, CROSS_PATCH, CROSS_IMAGE = 128, 3, 4, 24  # 2 heads of 64; 2 used
CROSS_MLP = int(CROSS_WIDTH * 2.6667)  # cross_visual.py's mlp_ratio
BATCH = 2


def _linear_module(**linears) -> nn.ModuleDict:
  return nn.ModuleDict({name: nn.Linear(*shape) for name, shape in linears.items()})


class EvaClipLayer(nn.Module):
  """visual.py's TransformerLayer: x + LN(Attn(x)); x + LN(MLP(x))."""

  def __init__(self, width, heads, hidden, eps):
    super().__init__()
    self.heads = heads
    self.input_layernorm = nn.LayerNorm(width, eps)
    self.attention = _linear_module(query_key_value=(width, 3 * width), dense=(width, width))
    self.mlp = _linear_module(fc1=(width, hidden), fc2=(hidden, width))
    self.post_attention_layernorm = nn.LayerNorm(width, eps)

  def forward(self, x):
    qkv = self.attention["query_key_value"](x)
    q, k, v = einops.rearrange(qkv, "b l (three n h) -> three b n l h", three=3, n=self.heads)
    a = einops.rearrange(F.scaled_dot_product_attention(q, k, v), "b n l h -> b l (n h)")
    x = x + self.input_layernorm(self.attention["dense"](a))
    return x + self.post_attention_layernorm(self.mlp["fc2"](F.gelu(self.mlp["fc1"](x))))


class LowRes(nn.Module):
  """visual.py's EVA2CLIPModel (CogAgent: with pos_embed) and its GLU."""

  def __init__(self, c, lm_width, glu_hidden):
    super().__init__()
    w, p = c["hidden_size"], c["patch_size"]
    self.patch_embedding = nn.Module()
    self.patch_embedding.proj = nn.Conv2d(3, w, p, p)
    self.patch_embedding.cls_embedding = nn.Parameter(torch.zeros(1, w))
    self.patch_embedding.position_embedding = nn.Embedding(c["num_positions"], w)
    self.transformer = nn.Module()
    self.transformer.layers = nn.ModuleList(
        EvaClipLayer(w, c["num_heads"], c["intermediate_size"], c["layer_norm_eps"])
        for _ in range(c["num_hidden_layers"]))
    self.linear_proj = _linear_module(linear_proj=(w, lm_width, False),
                                      gate_proj=(lm_width, glu_hidden, False),
                                      dense_h_to_4h=(lm_width, glu_hidden, False),
                                      dense_4h_to_h=(glu_hidden, lm_width, False))
    self.linear_proj["norm1"] = nn.LayerNorm(lm_width)
    self.boi = nn.Parameter(torch.zeros(1, 1, lm_width))
    self.eoi = nn.Parameter(torch.zeros(1, 1, lm_width))
    self.pos_embed = nn.Parameter(torch.zeros(c["num_positions"] - 1, w))

  def forward(self, images):
    e = self.patch_embedding
    x = e.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([e.cls_embedding.expand(x.shape[0], -1, -1), x], 1)
    x = x + e.position_embedding.weight[None]
    for layer in self.transformer.layers:
      x = layer(x)
    glu = self.linear_proj
    x = F.gelu(glu["norm1"](glu["linear_proj"](x[:, 1:] + self.pos_embed[None])))
    x = glu["dense_4h_to_h"](F.silu(glu["gate_proj"](x)) * glu["dense_h_to_4h"](x))
    batch = x.shape[0]
    return torch.cat([self.boi.expand(batch, -1, -1), x, self.eoi.expand(batch, -1, -1)], 1)


def rope_tables(head_dim, grid, reference=16):
  """cross_visual.py's VisionRotaryEmbeddingFast(dim=head_dim / 2, pt_seq_len=16,
  ft_seq_len=grid): cos, sin [grid^2, head_dim]."""
  dim = head_dim // 2
  freqs = 1.0 / 10_000 ** (torch.arange(0, dim, 2)[:dim // 2].float() / dim)
  freqs = torch.einsum("t,f->tf", torch.arange(grid) / grid * reference, freqs)
  freqs = einops.repeat(freqs, "t f -> t (f r)", r=2)
  freqs = torch.cat([freqs[:, None].expand(grid, grid, dim), freqs[None].expand(grid, grid, dim)],
                    -1).reshape(grid * grid, -1)
  return freqs.cos(), freqs.sin()


def rotate_half(x):
  x1, x2 = einops.rearrange(x, "... (d r) -> ... d r", r=2).unbind(-1)
  return einops.rearrange(torch.stack([-x2, x1], -1), "... d r -> ... (d r)")


class Eva02Attention(nn.Module):
  def __init__(self, width, heads, rope):
    super().__init__()
    self.heads, self.rope = heads, rope
    for name in ("q_proj", "k_proj", "v_proj"):
      setattr(self, name, nn.Linear(width, width, bias=False))
    self.q_bias = nn.Parameter(torch.zeros(width))
    self.v_bias = nn.Parameter(torch.zeros(width))
    self.inner_attn_ln = nn.LayerNorm(width, 1e-6)
    self.proj = nn.Linear(width, width)

  def forward(self, x):
    split = lambda t: einops.rearrange(t, "b l (n h) -> b n l h", n=self.heads)
    q = split(F.linear(x, self.q_proj.weight, self.q_bias))
    k = split(self.k_proj(x))
    v = split(F.linear(x, self.v_proj.weight, self.v_bias))
    cos, sin = self.rope
    q, k = (torch.cat([t[:, :, :1], t[:, :, 1:] * cos + rotate_half(t[:, :, 1:]) * sin], 2)
            for t in (q, k))
    a = einops.rearrange(F.scaled_dot_product_attention(q, k, v), "b n l h -> b l (n h)")
    return self.proj(self.inner_attn_ln(a))


class Eva02Block(nn.Module):
  def __init__(self, width, heads, hidden, rope):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, 1e-6)
    self.attn = Eva02Attention(width, heads, rope)
    self.norm2 = nn.LayerNorm(width, 1e-6)
    self.mlp = _linear_module(w1=(width, hidden), w2=(width, hidden), w3=(hidden, width))
    self.mlp["ffn_ln"] = nn.LayerNorm(hidden, 1e-6)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    m = self.mlp
    return x + m["w3"](m["ffn_ln"](F.silu(m["w1"](self.norm2(x))) * m["w2"](self.norm2(x))))


class CrossVision(nn.Module):
  """cross_visual.py's CrossVisionModel over EVAVisionTransformer (rope, naiveswiglu, subln,
  qkv_bias, xattn; no layer scale, no relative position bias)."""

  def __init__(self, width, blocks, patch, image):
    super().__init__()
    grid, heads = image // patch, width // 64
    rope = rope_tables(64, grid)
    model = nn.Module()
    model.patch_embed = nn.Module()
    model.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
    model.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    model.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
    model.blocks = nn.ModuleList(Eva02Block(width, heads, CROSS_MLP, rope) for _ in range(blocks))
    model.norm = nn.LayerNorm(width, 1e-6)
    model.head = nn.Linear(width, 12)
    self.vit = nn.Module()
    self.vit.model = model
    self.pos_embed = nn.Parameter(torch.zeros(grid * grid, width))

  def forward(self, images):
    m = self.vit.model
    x = m.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], 1) + m.pos_embed
    for block in m.blocks[:-1]:  # forward_features skips the last block
      x = block(x)
    return x[:, 1:] + self.pos_embed[None]  # return_all_features: no final norm


def _randomised(module):
  torch.manual_seed(0)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.2 * torch.randn_like(p))
  return module.eval()


def _state(module, prefix):
  return {prefix + k: v.numpy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
  low = _randomised(LowRes(LOW, files.D, files.MLP))
  high = _randomised(CrossVision(CROSS_WIDTH, CROSS_BLOCKS, CROSS_PATCH, CROSS_IMAGE))
  root = tmp_path_factory.mktemp("cogagent_towers")
  files.write_release(root, vision=LOW, cross_in=CROSS_WIDTH, cross_image=CROSS_IMAGE,
                      towers={**_state(low, "model.vision."),
                              **_state(high, "model.cross_vision.")})
  logged = []
  model, params = released.import_released(cogagent, {"checkpoint": str(root)},
                                           log=logged.append)
  assert len(logged) == 1 and "WARNING" not in logged[0]
  return low, high, model, params


def _images(size, seed):
  return np.random.default_rng(seed).uniform(-1, 1, (BATCH, 1, size, size, 3)).astype(np.float32)


def _torch(images):
  return torch.from_numpy(images[:, 0].transpose(0, 3, 1, 2).copy())


def test_low_res_tower_and_adapter_match_visual_py(towers):
  low, _, model, params = towers
  images = _images(LOW["image_size"], 1)
  ours = model.apply({"params": params}, images, method="encode_images")
  with torch.no_grad():
    theirs = low(_torch(images)).numpy()
  assert ours.shape == (BATCH, 1, 16 + 2, files.D)
  np.testing.assert_allclose(np.asarray(ours[:, 0]), theirs, rtol=1e-4, atol=1e-4)


def test_high_res_tower_matches_cross_visual_py(towers):
  _, high, model, params = towers
  images = _images(CROSS_IMAGE, 2)
  ours = model.apply({"params": params}, images, method="encode_high_res")
  with torch.no_grad():
    theirs = high(_torch(images)).numpy()
  assert ours.shape == (BATCH, (CROSS_IMAGE // CROSS_PATCH) ** 2, CROSS_WIDTH)
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)
  # the rotary positions matter: without them the outputs differ well beyond the tolerance
  no_rope = model.clone(high_res=model.high_res.clone(rotary_2d=False))
  plain = no_rope.apply({"params": params}, images, method="encode_high_res")
  assert np.abs(np.asarray(plain) - theirs).max() > 1e-2
