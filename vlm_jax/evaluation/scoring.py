"""Log-likelihood of candidate answers: closed-set VQA, caption ranking, zero-shot
classification ("a photo of a {class}").

A candidate is scored as an answer to a prompt (`heldout.as_prompt` inputs): it is written
into the answer slots with the stop token, and the model's teacher-forced log-probability of
those tokens is summed (`model.apply(batch)` logits, so every family scores through its
training forward: SimVLM/Prismer rank with the decoder over the encoded image and prefix,
decoder-only families with the prompt in context).
"""
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import distributed


def with_answer(inputs: dict, answer_ids, stop_id: int, suffix_length: int | None = None, *,
                vocab):
  """A training-layout example whose last loss span is `answer_ids` + stop (`vocab`'s bos
  starts an encoder-decoder's answer, its pad fills the rest)."""
  answer = list(answer_ids) + [stop_id]
  example = dict(inputs)
  if "prefix_tokens" in inputs:  # encoder-decoder: decoder inputs BOS, answer[:-1]
    length = suffix_length
    start, inputs_ids = 0, [vocab.require_bos("scoring with a decoder")] + answer[:-1]
  else:
    length = len(inputs["tokens"])
    start = int(np.sum(inputs["token_mask"] > 0)) - 1  # the last prompt token
    inputs_ids = list(inputs["tokens"][:start + 1]) + answer[:-1]
  if start + len(answer) > length:
    raise ValueError(f"answer of {len(answer)} tokens does not fit after a prompt of "
                     f"{start + 1} in {length} slots (config data.sequence_length / "
                     "suffix_length).")
  tokens = np.full((length,), vocab.pad_id, np.int32)
  tokens[:len(inputs_ids)] = inputs_ids
  targets = np.full((length,), vocab.pad_id, np.int32)
  targets[start:start + len(answer)] = answer
  loss_mask = np.zeros((length,), np.float32)
  loss_mask[start:start + len(answer)] = 1.0
  example.update(tokens=tokens, targets=targets, loss_mask=loss_mask,
                 loss_weight=np.float32(1.0))
  if "token_mask" in inputs:
    token_mask = np.zeros((length,), np.float32)
    token_mask[:len(inputs_ids)] = 1.0
    example["token_mask"] = token_mask
  return example


@distributed.jit(static_argnames=("model",))
def _log_likelihood(params, batch, *, model):
  logits = model.apply({"params": params}, batch).astype(jnp.float32)
  log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None],
                                  axis=-1)[..., 0]
  return jnp.sum(log_probs * batch["loss_mask"], axis=-1)


def sequence_log_likelihood(model, params, batch) -> np.ndarray:
  """[B] sum over loss_mask of log p(targets) under the model's full forward (host numpy in
  every process of a multi-process job, which all pass the same batch)."""
  batch = {k: np.asarray(v) for k, v in batch.items()}
  return distributed.fetch(_log_likelihood(params, batch, model=model))


def rank_candidates(model, params, prompts: list[dict], candidates: list[list[int]],
                    stop_id: int, *, vocab, suffix_length: int | None = None,
                    batch_size: int = 16) -> np.ndarray:
  """Log-likelihoods [len(prompts), len(candidates)] of every candidate (token ids) after
  every prompt. Rows are scored in fixed-size batches (the last one padded)."""
  rows = [with_answer(p, c, stop_id, suffix_length, vocab=vocab) for p in prompts
          for c in candidates]
  scores = []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
    batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
    scores.append(sequence_log_likelihood(model, params, batch))
  return np.concatenate(scores)[:len(rows)].reshape(len(prompts), len(candidates))
