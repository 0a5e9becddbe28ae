"""Generated sample data in the real formats (img2dataset shards, text jsonl, MMC4, OBELICS),
from a small scene grammar (`scenes.py`) every word of which is visible in the image; twenty
real photographs; the scenes labelled with expert maps; GUI screens; objects with boxes
recovered from scenes; the sample tokenizer."""
