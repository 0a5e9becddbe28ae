"""A seventh family defined entirely outside the package (tests/test_plugin_family.py): its
model (`model.py`), data module (`data.py`) and config (`config.py`), found by the name
`toy_family` with tests/ on the Python path."""
