"""Bounding boxes written in text. A box format is a module with the same functions:
`normalise_box(pixel box, width, height)` -> ints, `box_text(box)` / `format_box(pixel box,
width, height)` -> text, `parse_boxes(text)` (exactly one box text), `find_boxes(free text)`
-> every well-formed box in order, and `pixel_box(box, width, height)`. Malformed text raises
`BoxFormatError` naming it. A family names its format as `BOX_FORMAT` in its data module.

  percent   `{<x1><y1><x2><y2>}`, ints in 0..100 (MiniGPT-v2)
  permille  `[[x0,y0,x1,y1]]`, three digits in 000..999 (CogAgent / CogVLM)
"""


class BoxFormatError(ValueError):
  """Malformed or out-of-range box text or coordinates."""
