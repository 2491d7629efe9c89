"""Many sequences decoding together: the batch engine, its per-layer batch caches, decode groups, MTP in a
batch and joint prefill."""
