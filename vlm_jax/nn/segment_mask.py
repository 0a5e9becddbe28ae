"""Attention masks in factored form, which fused kernels take without a [T, S] array.

    query t of example b may attend key s  iff  q_segment_ids[b, t] == kv_segment_ids[b, s]
                                                and (not causal or s <= t)

Every mask the families build for a training forward has this form:

    key padding (encoder self-attention, encoder-decoder cross-attention, with or without
      a causal decoder)            q ids 1, kv ids 1 (valid) / 0 (padding): `key_padding`
    causal decoder + key padding   the same with causal=True: `causal`
    packed rows (several examples per row)
                                   q ids = kv ids = the example's index (0 = padding), plus
                                   causal for decoders; build `SegmentMask` directly
    Flamingo media visibility      q id = the latest preceding media item, kv id = the item
                                   a visual token belongs to (gated_xattn.media_segment_mask)
    packed rows' cross-attention   q ids = the row's segment ids, kv id = the example a key's
      to per-example items         item (image slot) belongs to: `packed_cross`, ids of the
                                   slots from `slot_segment_ids` (CogAgent's high-res keys,
                                   Prismer's encoded images)

What is not of this form stays a dense boolean [B, 1|N, T, S] array, which MultiHeadAttention
always computes with XLA: PrefixLM visibility inside one decoder stack (causal OR both in
the prefix: decoder_lm.prefix_lm_mask), Flamingo's attend-to-every-previous-image option,
and the KV-cache masks of step-by-step decoding.

A query row that matches no key is fully masked: its attention output is exactly zero, on
every implementation (nn/fused_attention.py).
"""
import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SegmentMask:
  q_segment_ids: jax.Array  # [B|1, T] int32, any value but int32's minimum (padding keys')
  kv_segment_ids: jax.Array  # [B|1, S] int32
  causal: bool = flax.struct.field(pytree_node=False, default=False)  # needs T == S

  def dense(self) -> jax.Array:
    """The boolean mask [B, 1, T, S]."""
    mask = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
    if self.causal:
      length = mask.shape[-1]
      mask = mask & jnp.tril(jnp.ones((length, length), jnp.bool_))
    return mask[:, None]

  def row_valid(self) -> jax.Array:
    """[B, T] bool: the query row attends to at least one key. XLA fuses the comparison into
    the reduction, so the [B, T, S] mask is not stored."""
    return jnp.any(self.dense()[:, 0], axis=-1)

  def with_batch(self, batch: int) -> "SegmentMask":
    """Ids of batch 1 broadcast to `batch` rows (kernels take one row per example)."""
    grow = lambda ids: jnp.broadcast_to(ids, (batch, ids.shape[1]))
    return SegmentMask(grow(self.q_segment_ids), grow(self.kv_segment_ids), self.causal)

  def take_queries(self, index: jax.Array) -> "SegmentMask":
    """The mask of queries `index` [B, T'] only, keys unchanged (a decoding step gets the row
    of the prompt token it continues). Not for causal masks: the rows' positions are lost."""
    if self.causal:
      raise ValueError("SegmentMask.take_queries: a causal mask's rows need their positions.")
    return SegmentMask(jnp.take_along_axis(self.q_segment_ids, index, axis=1),
                       self.kv_segment_ids)


def key_padding(key_valid: jax.Array, query_length: int, causal: bool = False) -> SegmentMask:
  """Every query may attend every valid key (key_valid [B, S], 1/True = valid); with causal,
  only those at or before it. Padded queries attend like valid ones (their outputs are
  unused), as `attention.padding_mask(None, key_valid)` does."""
  key_valid = jnp.asarray(key_valid)
  return SegmentMask(jnp.ones((key_valid.shape[0], query_length), jnp.int32),
                     (key_valid > 0).astype(jnp.int32), causal)


def causal(length: int, token_valid: jax.Array | None = None) -> SegmentMask:
  """A causal decoder's self-attention mask, padding (token_valid [B, T]) masked as keys: the
  factored `attention.causal_mask(T) & attention.padding_mask(None, token_valid)`; without
  token_valid, ids of batch 1 (broadcast)."""
  if token_valid is None:
    token_valid = jnp.ones((1, length), jnp.int32)
  return key_padding(token_valid, length, causal=True)


def packed(segment_ids: jax.Array) -> SegmentMask:
  """Causal self-attention inside each example of packed rows (segment_ids [B, T], 0 for
  padding: padding attends only padding, and no example sees another; data/packing.py)."""
  return SegmentMask(segment_ids, segment_ids, causal=True)


def packed_context(batch) -> dict:
  """A decoder trunk's `attention_mask` and `positions` for packed rows (the batch's
  `segment_ids` and `positions`, data/packing.py): causal attention inside each example,
  positions restarting per example; {} when the batch is not packed."""
  if "segment_ids" not in batch:
    return {}
  return {"attention_mask": packed(batch["segment_ids"]), "positions": batch["positions"]}


def slot_segment_ids(segment_ids: jax.Array, slot_positions: jax.Array,
                     slot_used: jax.Array) -> jax.Array:
  """[B, K] int32: the segment of each item slot of packed rows (data/packing.py), read at
  the slot's first placeholder (slot_positions [B, K]); 0 (padding's) for unused slots
  (slot_used [B, K] > 0 marks the used ones)."""
  at_slot = jnp.take_along_axis(segment_ids, slot_positions, axis=1)
  return jnp.where(slot_used > 0, at_slot, 0).astype(jnp.int32)


def packed_cross(segment_ids: jax.Array, slot_segments: jax.Array,
                 keys_per_slot: int) -> SegmentMask:
  """Cross-attention of packed rows (segment_ids [B, T]) to keys laid out slot after slot,
  keys_per_slot each (slot_segments [B, K]: `slot_segment_ids`): a token attends only the
  keys of its own example's slots. Padding queries see only unused slots (none: output 0)."""
  return SegmentMask(segment_ids, jnp.repeat(slot_segments, keys_per_slot, axis=1))


def take_query_rows(mask, index: jax.Array):
  """Rows `index` [B] of a dense [B, 1, T, S] mask or a SegmentMask, as a one-query mask."""
  if isinstance(mask, SegmentMask):
    return mask.take_queries(index[:, None])
  return jnp.take_along_axis(mask, index[:, None, None, None], axis=2)
