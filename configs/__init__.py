"""Experiment configs (ml_collections `get_config(arg)` files) for `python -m train --config configs/<name>.py`."""
