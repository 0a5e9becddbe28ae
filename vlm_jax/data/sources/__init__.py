"""Random-access readers (grain data sources), one module per format: img2dataset webdataset
tars, jsonl text, ingested ArrayRecord shards, interleaved documents (MMC4, OBELICS).
`vlm_jax.data.catalog.READERS` names them."""
