"""transformers (+ peft) train steps at our bench sizes (PyTorch, CPU).

llama_lora: `LlamaForCausalLM` (random init) wrapped by peft LoRA on q_proj / v_proj (the
            base frozen by peft), the LM path of MiniGPT-v2; AdamW on the LoRA weights,
            global gradient-norm clip.
t5:         `T5ForConditionalGeneration` (v1.1 layout: gated-GELU, RMSNorm, relative
            positions, untied head), everything trained, as SimVLM's text path.
Labels follow our batch's loss_mask (-100 elsewhere); HF averages the token cross-entropy
over the labelled tokens as our loss does (loss_weight is 1 in these batches).
"""
import numpy as np
import torch


def _adamw(params, sizes):
  return torch.optim.AdamW(params, lr=sizes["learning_rate"], betas=(sizes["b1"], sizes["b2"]),
                           eps=sizes["eps"], weight_decay=sizes["weight_decay"])


def _step_fn(model, optimizer, trainable, inputs, clip):
  def step():
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
  return step


def _counts(model, trainable):
  return {"params_total": sum(p.numel() for p in model.parameters()),
          "params_trainable": sum(p.numel() for p in trainable)}


def shifted_labels(tokens, loss_mask):
  """HF causal LMs shift inside: logits[t] predicts labels[t + 1]. Ours: targets[t] is the
  next token where loss_mask[t] is on."""
  labels = torch.full_like(tokens, -100)
  keep = torch.from_numpy(loss_mask[:, :-1] > 0)
  labels[:, 1:] = torch.where(keep, tokens[:, 1:], labels[:, 1:])
  return labels


def make_llama_lora_step(sizes: dict, batch: dict):
  from peft import LoraConfig, get_peft_model
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  base = LlamaForCausalLM(LlamaConfig(
      vocab_size=sizes["vocab_size"], hidden_size=sizes["width"],
      intermediate_size=sizes["mlp_dim"], num_hidden_layers=sizes["num_layers"],
      num_attention_heads=sizes["num_heads"], num_key_value_heads=sizes["num_kv_heads"],
      max_position_embeddings=sizes["length"], rms_norm_eps=sizes["norm_epsilon"],
      tie_word_embeddings=False))
  model = get_peft_model(base, LoraConfig(
      r=sizes["lora_rank"], lora_alpha=sizes["lora_alpha"],
      lora_dropout=sizes["lora_dropout"], target_modules=["q_proj", "v_proj"]))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
  inputs = {"input_ids": tokens,
            "attention_mask": torch.from_numpy(batch["token_mask"] > 0).long(),
            "labels": shifted_labels(tokens, batch["loss_mask"])}
  step = _step_fn(model, _adamw(trainable, sizes), trainable, inputs, sizes["grad_clip_norm"])
  return step, _counts(model, trainable)


def make_t5_step(sizes: dict, batch: dict):
  from transformers import T5Config, T5ForConditionalGeneration
  torch.manual_seed(0)
  config = T5Config(
      vocab_size=sizes["vocab_size"], d_model=sizes["width"], d_kv=sizes["head_dim"],
      d_ff=sizes["mlp_dim"], num_layers=sizes["encoder_layers"],
      num_decoder_layers=sizes["decoder_layers"], num_heads=sizes["num_heads"],
      relative_attention_num_buckets=sizes["relative_buckets"],
      relative_attention_max_distance=sizes["relative_max_distance"],
      feed_forward_proj="gated-gelu", dropout_rate=0.0)
  config.tie_word_embeddings = False  # v1.1's separate head (the constructor ignores it)
  model = T5ForConditionalGeneration(config)
  model.train()
  trainable = list(model.parameters())
  targets = torch.from_numpy(batch["targets"].astype(np.int64))
  inputs = {"input_ids": torch.from_numpy(batch["prefix_tokens"].astype(np.int64)),
            "attention_mask": torch.from_numpy(batch["prefix_mask"] > 0).long(),
            "decoder_input_ids": torch.from_numpy(batch["tokens"].astype(np.int64)),
            "decoder_attention_mask": torch.from_numpy(batch["loss_mask"] > 0).long(),
            "labels": torch.where(torch.from_numpy(batch["loss_mask"] > 0), targets, -100)}
  step = _step_fn(model, _adamw(trainable, sizes), trainable, inputs, sizes["grad_clip_norm"])
  return step, _counts(model, trainable)
