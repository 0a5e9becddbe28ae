"""The attention computation behind MultiHeadAttention, by `attention_impl`:

    xla     jax.nn.dot_product_attention on XLA: the [B, N, T, S] scores live in memory (and
            are kept for the backward pass). Takes every mask and a logits bias.
    splash  Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention) on TPU;
            anywhere else it runs in Pallas interpret mode (tests on CPU). Scores exist only
            block by block in VMEM; the backward pass recomputes them from q, k, v and the
            log-sum-exp. The mask is a static part, full or causal (blocks above the diagonal
            are skipped), and segment ids (padding, packed examples, Flamingo media).
    cudnn   jax.nn.dot_product_attention(implementation='cudnn'): cuDNN flash attention on
            GPU, bfloat16/float16 only. Causal as `is_causal` (no work above the diagonal);
            segment ids as a boolean [B, 1, T, S] mask, which cuDNN takes as a bias (1/N of
            the scores' size, not kept per head).

The fused kernels take masks in the factored form `segment_mask.SegmentMask` (or None). A call
they cannot take runs on XLA, logged once per layer and reason:
  - the mask is a dense boolean array: it has no factored form (PrefixLM in one stack,
    Flamingo's only_attend_immediate=False, the KV-cache masks of decoding);
  - decode=True: one-token steps over the cache are bound by reading the cache, not by
    scores, and the cache's causal mask depends on the traced cache index;
  - a logits bias (T5's relative positions) with splash: the kernel adds no bias;
  - cudnn on float32: cuDNN's flash attention takes bfloat16/float16 only.

Fully masked query rows (no key to attend to: Flamingo text before any image, an example
with every key padded) output exactly zero on every path. The kernels must not see such rows
(a softmax over nothing divides by zero there, and the NaN reaches every key's gradient), so
they attend to key 0 instead and their output is replaced by zero: their cotangent is then
zero, so they add nothing to any gradient.
"""
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from vlm_jax.nn import segment_mask as segment_mask_lib

IMPLEMENTATIONS = ("xla", "splash", "cudnn")
_LANES = 128  # splash's sequence blocks are multiples of this
_BLOCKS = (512, 256, 128)  # preferred first; see _block
_PAD_KEY_ID = jnp.iinfo(jnp.int32).min  # segment id of padded keys: no query has it
_KERNEL_OUTPUTS = "splash_attention_outputs"  # checkpoint name of its output and log-sum-exp
_log = logging.getLogger(__name__)
_logged = set()


def _fallback(name: str, implementation: str, reason: str):
  if (name, reason) not in _logged:
    _logged.add((name, reason))
    _log.info("attention %s: %s -> xla: %s", name or "?", implementation, reason)


def _zero_masked_rows(out, row_valid):
  """out [B, T, N, H] with rows of row_valid [B, T] (or [B, N, T]) False set to zero."""
  if row_valid.ndim == 3:
    row_valid = jnp.swapaxes(row_valid, 1, 2)[..., None]
  else:
    row_valid = row_valid[:, :, None, None]
  return jnp.where(row_valid, out, jnp.zeros((), out.dtype))


def xla_attention(q, k, v, mask=None, bias=None, *, scale: float):
  """q [B, T, N, H], k/v [B, S, K, H]; mask bool broadcastable to [B, N, T, S] or a
  SegmentMask; bias float broadcastable to [B, N, T, S]."""
  if isinstance(mask, segment_mask_lib.SegmentMask):
    mask = mask.dense()
  if mask is not None:
    mask = jnp.asarray(mask, jnp.bool_)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if bias is not None:
    bias = jnp.asarray(bias, q.dtype)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
  if mask is None:
    return out
  # Rows with no valid key: the XLA softmax would spread over the masked keys; zero them.
  batch, q_len = q.shape[:2]
  return _zero_masked_rows(out, jnp.broadcast_to(jnp.any(mask, axis=-1),
                                                 (batch, mask.shape[1], q_len)))


def cudnn_attention(q, k, v, mask=None, bias=None, *, scale: float,
                    implementation: str | None = "cudnn"):
  """As xla_attention with mask None or a SegmentMask. `implementation` is passed to
  jax.nn.dot_product_attention: 'cudnn' on GPU; tests run this code with 'xla' on CPU.
  jax 0.10's cuDNN training path takes even sequence lengths only: odd ones are padded by a
  token (a padded key is masked, which costs a [B, 1, T, S] bias)."""
  q_len, kv_len = q.shape[1], k.shape[1]
  causal = mask is not None and mask.causal
  q_even, kv_even = q_len + q_len % 2, kv_len + kv_len % 2
  q, k, v, q_ids, kv_ids, row_valid = _pad_with_ids(q, k, v, mask, q_even, kv_even)
  dense = None if q_ids is None else (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]
  if bias is not None:
    bias = jnp.asarray(bias, q.dtype)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    grow = [(0, 0), (0, 0), (0, q_even - q_len if bias.shape[2] > 1 else 0),
            (0, kv_even - kv_len if bias.shape[3] > 1 else 0)]
    bias = jnp.pad(bias, grow)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=dense, scale=scale,
                                     is_causal=causal, implementation=implementation)
  out = out[:, :q_len]
  return out if row_valid is None else _zero_masked_rows(out, row_valid)


def _block(length: int) -> tuple[int, int]:
  """(block, padded length): the largest block of _BLOCKS whose padding stays within 1/16 of
  the least (a multiple of 128), so long sequences get big blocks and short ones no waste."""
  least = -(-length // _LANES) * _LANES
  for block in _BLOCKS:
    padded = -(-length // block) * block
    if padded <= least + least // 16:
      return block, padded
  return _LANES, least


def _pad_axis1(x, length: int, value):
  pad = length - x.shape[1]
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  if jnp.ndim(value):  # per-example fill [B]
    filler = jnp.broadcast_to(value.reshape((-1,) + (1,) * (x.ndim - 1)),
                              (x.shape[0], pad) + x.shape[2:])
    return jnp.concatenate([x, filler.astype(x.dtype)], axis=1)
  return jnp.pad(x, widths, constant_values=value)


def _pad_with_ids(q, k, v, mask, q_padded: int, kv_padded: int):
  """q, k, v zero-padded along the sequence to q_padded / kv_padded, with segment ids
  [B, q_padded] / [B, kv_padded] (None when neither a mask nor padded keys need them) under
  which padded keys are never attended and every query row attends to something; and
  row_valid [B, T] (None without a mask)."""
  batch, q_len = q.shape[:2]
  kv_len = k.shape[1]
  q_ids = kv_ids = row_valid = None
  if mask is not None:
    mask = mask.with_batch(batch)
    row_valid = mask.row_valid()
    # Rows that see nothing attend to key 0 instead (module docstring).
    q_ids = jnp.where(row_valid, mask.q_segment_ids, mask.kv_segment_ids[:, :1])
    kv_ids = mask.kv_segment_ids
  elif kv_padded != kv_len:  # padded keys need ids to be masked
    q_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
  if q_ids is not None:
    kv_ids = kv_ids.astype(jnp.int32)
    q_ids = _pad_axis1(q_ids.astype(jnp.int32), q_padded, kv_ids[:, 0])
    kv_ids = _pad_axis1(kv_ids, kv_padded, _PAD_KEY_ID)
  q, k, v = _pad_axis1(q, q_padded, 0), _pad_axis1(k, kv_padded, 0), _pad_axis1(v, kv_padded, 0)
  return q, k, v, q_ids, kv_ids, row_valid


def _platform() -> str:
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _local_splash(q, k, v, q_ids, kv_ids, *, causal: bool, blocks, interpret: bool):
  """Per-device splash attention: q [b, Tp, n, H], k/v [b, Sp, k, H] (padded to blocks),
  ids [b, Tp] / [b, Sp] or None -> [b, Tp, n, H]."""
  (block_q, block_kv), shape = blocks, (q.shape[1], k.shape[1])
  static = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([static] * q.shape[2]),
      block_sizes=splash.BlockSizes(
          block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
          block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
          block_q_dq=block_q, block_kv_dq=block_kv),
      head_shards=1, q_seq_shards=1, residual_checkpoint_name=_KERNEL_OUTPUTS,
      interpret=interpret)
  heads_first = lambda x: jnp.swapaxes(x, 0, 1)  # [T, N, H] <-> [N, T, H]
  if q_ids is None:
    one = lambda q, k, v: heads_first(kernel(heads_first(q), heads_first(k), heads_first(v)))
    return jax.vmap(one)(q, k, v)
  def one(q, k, v, q_ids, kv_ids):
    return heads_first(kernel(heads_first(q), heads_first(k), heads_first(v),
                              segment_ids=splash.SegmentIds(q_ids, kv_ids)))
  return jax.vmap(one)(q, k, v, q_ids, kv_ids)


def _shard_over_batch_and_heads(fn, *arrays):
  """Runs `fn(*arrays)` per device under the context mesh (if any): [B, L, N, H] arrays and
  [B, L] segment ids split over the batch and heads as the logical-axis rules shard them,
  the sequences whole (the kernel needs every key)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*arrays)
  batch_axes, _, heads_axes, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  axes = lambda name: () if name is None else (name if isinstance(name, tuple) else (name,))
  size = lambda names: math.prod(mesh.shape[a] for a in axes(names))
  if any(a.ndim == 4 and a.shape[2] % size(heads_axes) for a in arrays):
    heads_axes = None  # e.g. fewer key/value heads than tensor shards: replicate heads
  if arrays[0].shape[0] % size(batch_axes):
    batch_axes = None
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  specs = tuple(P(batch_axes, None, heads_axes, None) if a.ndim == 4 else P(batch_axes, None)
                for a in arrays)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0],
                       check_vma=False)(*arrays)


def splash_attention(q, k, v, mask=None, *, scale: float, interpret: bool | None = None):
  """As xla_attention with mask None or a SegmentMask (no bias). interpret None: Pallas
  interpret mode unless the context mesh (or default backend) is a TPU.

  For the backward pass only q, k, v as given and the kernel's output and log-sum-exp are
  kept; the padded, scaled, heads-first copies the kernel reads are recomputed (cheap copies;
  kept, they would cost more memory than XLA's scores on sequences of a few hundred)."""
  platform = _platform()
  if platform in ("gpu", "cuda", "rocm"):
    raise ValueError("config.model.attention_impl='splash' is a TPU kernel (on a GPU it would "
                     "run in Pallas interpret mode); use 'cudnn' on GPUs.")
  if interpret is None:
    interpret = platform != "tpu"
  keep_kernel_outputs = jax.checkpoint_policies.save_only_these_names(_KERNEL_OUTPUTS)
  fn = functools.partial(_splash_attention, scale=scale, interpret=interpret)
  return jax.checkpoint(fn, policy=keep_kernel_outputs)(q, k, v, mask)


def _splash_attention(q, k, v, mask, *, scale: float, interpret: bool):
  q_len, kv_len = q.shape[1], k.shape[1]
  causal = mask is not None and mask.causal
  block_q, q_padded = _block(q_len)
  block_kv, kv_padded = _block(kv_len)
  if causal:  # one square causal mask over the padded sequence
    block_q = block_kv = min(block_q, block_kv)
    q_padded = kv_padded = max(q_padded, kv_padded)
  q, k, v, q_ids, kv_ids, row_valid = _pad_with_ids(q * jnp.asarray(scale, q.dtype), k, v,
                                                    mask, q_padded, kv_padded)
  fn = lambda q, k, v, *ids: _local_splash(q, k, v, *(ids or (None, None)), causal=causal,
                                           blocks=(block_q, block_kv), interpret=interpret)
  arrays = (q, k, v) if q_ids is None else (q, k, v, q_ids, kv_ids)
  out = _shard_over_batch_and_heads(fn, *arrays)[:, :q_len]
  return out if row_valid is None else _zero_masked_rows(out, row_valid)


def dot_product_attention(q, k, v, mask=None, bias=None, *, scale: float,
                          implementation: str = "xla", decode: bool = False, name: str = ""):
  """q [B, T, N, H], k/v [B, S, K, H] (N % K == 0) -> [B, T, N, H] with `implementation`
  (module docstring); mask None, a bool array broadcastable to [B, N, T, S], or a
  SegmentMask; bias float broadcastable to [B, N, T, S]."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention_impl={implementation!r}: expected one of "
                     f"{IMPLEMENTATIONS}.")
  factored = mask is None or isinstance(mask, segment_mask_lib.SegmentMask)
  reason = None
  if implementation == "xla":
    pass
  elif decode:
    reason = "decode=True (cache steps)"
  elif not factored:
    reason = "a dense boolean mask (no SegmentMask form)"
  elif implementation == "splash" and bias is not None:
    reason = "a logits bias (splash adds none)"
  elif implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    reason = f"{q.dtype} inputs (cuDNN flash attention takes bfloat16/float16)"
  if reason:
    _fallback(name, implementation, reason)
  if implementation == "xla" or reason:
    return xla_attention(q, k, v, mask, bias, scale=scale)
  if implementation == "cudnn":
    return cudnn_attention(q, k, v, mask, bias, scale=scale)
  return splash_attention(q, k, v, mask, scale=scale)
