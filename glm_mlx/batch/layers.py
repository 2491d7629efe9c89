"""Which batch cache holds a layer's rows: each per-sequence cache names its family (`batch_kind`:
"kv" GLM-5.1's DSACache, "pooled_kv" and "recurrent" GLM-5.3-Flash's), so the decode group builds,
lends and stores every layer the same way whatever the model."""

from __future__ import annotations

from .cache import BatchLayerCache, RaggedLayerCache
from .state_cache import BatchKDACache, BatchPooledCache

PARTS = {"kv": BatchLayerCache, "pooled_kv": BatchPooledCache}


def class_of(cache):
    kind = getattr(cache, "batch_kind", "kv")
    return BatchKDACache if kind == "recurrent" else PARTS[kind]


def layer_of(caches: list, moved: dict | None = None, ranges=None):
    """One layer's batch cache from the members' own caches of it (and rows `moved` from another group's);
    rows of very different lengths in buffers of their own where `ranges` says (a fixed-size state has none)."""
    cls = class_of(caches[0])
    if cls is BatchKDACache:
        return BatchKDACache.of(caches, moved)
    return RaggedLayerCache.of(caches, moved, ranges, part=cls)


def lend(cache):
    """A member's own buffers go while its rows are in the batch (store_row gives them back)."""
    class_of(cache).lend(cache)


def joint_prefill(model) -> bool:
    """Whether prompts of this model may prefill together in one padded pass."""
    return all(class_of(c).joint_prefill for c in model.make_cache(mtp=True))
