"""The network: its config (ModelArgs), the GLM-5.1 model (MLA, the DSA indexer and top-k, MoE, the MTP layer),
per-layer caches, checkpoint key remapping (sanitize) and loading."""
