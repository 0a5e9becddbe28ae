"""CogAgent's FLOPs claim: the high-res cross-module vs high-res tokens through the LM.

  python bench/cogagent_flops.py [--text 256]

Prints a markdown table (docs/models.md) of forward FLOPs per example for the 18b layout
(configs/cogagent.py): CogAgent with 224 px low-res tokens in the LM and the 1120 px
cross-module, against the same LM (visual expert included) fed the image through the
low-res branch alone (EVA2-CLIP-E + adapter + image tokens in the LM) at 490 px (CogVLM's
resolution) and at 1120 px. Counts come from `vlm_jax.models.cogagent.flops_parts` (matmuls
only, causal attention at half); 'lm' routes each token through one expert, i.e. it leaves out
the second weight set our fixed-shape visual expert also applies (`visual_expert` part).
"""
import argparse

from vlm_jax import config as config_lib
from vlm_jax import flops

ROWS = (
    ("CogAgent: 224 px in the LM + 1120 px cross-module", ""),
    ("low-res branch alone at 490 px (CogVLM)", "cross_module=False,image=490,stage=0"),
    ("low-res branch alone at 1120 px", "cross_module=False,image=1120,stage=0"),
)
PARTS = ("vision", "adapter", "lm", "logits", "high_res", "cross_attention")


def table(text: int) -> str:
  lines = ["| model | LM tokens | " + " | ".join(PARTS) + " | total TFLOPs | vs CogAgent |",
           "|---|---|" + "---|" * (len(PARTS) + 2)]
  base = None
  for name, options in ROWS:
    arg = ",".join(filter(None, ["18b", options, f"text={text}"]))
    config = config_lib.load_config(f"configs/cogagent.py:{arg}")
    parts = flops.forward_parts(config)
    parts.pop("visual_expert", None)
    total = sum(parts.values())
    base = base or total
    cells = [f"{parts[p] / 1e12:.2f}" if p in parts else "-" for p in PARTS]
    lines.append(f"| {name} | {config.data.sequence_length} | " + " | ".join(cells)
                 + f" | **{total / 1e12:.2f}** | {total / base:.2f}x |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--text", type=int, default=256, help="text tokens after the image")
  print(table(parser.parse_args().text))


if __name__ == "__main__":
  main()
