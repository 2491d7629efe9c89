"""The block prefix cache: the RAM tier (cache.py) and the SSD tier (store.py)."""
