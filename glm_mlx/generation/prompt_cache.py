"""Prompt cache: what the model has already computed for a conversation, reusable across turns
and savable to disk.

A multi-turn chat re-sends the whole conversation each turn; only the tokens past the common
prefix with the cached tokens are prefilled. When the prompt diverges, every cache (latent KV,
indexer keys, MTP layer) is trimmed back to the common prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .. import atomic
from ..model.cache import DSACache
from ..errors import GlmMlxError


class PromptCacheError(GlmMlxError):
    hint = "The prompt cache file does not match this model; delete it or start a new conversation."


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists. A binary search over slice comparisons (done in
    C): a 100K-token conversation is compared in about 17 list compares, not 100K Python steps."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo] holds; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class PromptCache:
    cache: list[DSACache]
    mtp_cache: DSACache | None = None
    tokens: list[int] = field(default_factory=list)
    pending: mx.array | None = None  # [1, m, hidden]: h of the last m positions, MTP slots not yet written
    extra: dict = field(default_factory=dict)  # caller's data saved alongside (e.g. chat messages)
    # [1, 1, hidden]: set while the MTP cache's last slot pairs h of the last position with a
    # drafted-ahead token that is not in `tokens` (see Engine._decode_mtp); `settle` undoes it.
    ahead: mx.array | None = None

    @classmethod
    def fresh(cls, model, mtp: bool) -> "PromptCache":
        caches = model.make_cache(mtp=mtp and model.has_mtp)
        mtp_cache = caches.pop() if mtp and model.has_mtp else None
        return cls(cache=caches, mtp_cache=mtp_cache)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.all_caches())

    def all_caches(self) -> list[DSACache]:
        return self.cache + ([self.mtp_cache] if self.mtp_cache is not None else [])

    def arrays(self) -> list[mx.array]:
        return [a for c in self.all_caches() for a in c.state]

    def settle(self):
        """Drop a drafted-ahead MTP slot: its h becomes pending again, so the invariant holds."""
        if self.ahead is not None:
            self.mtp_cache.trim(1)
            self.pending = self.ahead if self.pending is None else mx.concatenate([self.pending, self.ahead], axis=1)
            self.ahead = None

    def reuse(self, prompt: list[int], model=None) -> int:
        """Trim to the longest reusable prefix of `prompt`; return how many tokens are reused.

        At least one prompt token is always left to process (its logits start generation).
        With MTP, slot i needs h_i: if we cut below the written MTP slots, h at the cut is gone, so
        we cut one token earlier, where the MTP slot is still valid and the main model recomputes h.
        """
        self.settle()
        p = common_prefix(self.tokens, prompt)
        r = min(p, len(prompt) - 1)
        # A cache that cannot go back to r (a recurrent state: GLM-5.3-Flash's KDA layers, see
        # model/glm5_next_cache.py) makes the prefix unusable: start again from nothing.
        if any(not c.can_trim_to(r) for c in self.cache if hasattr(c, "can_trim_to")):
            r = 0
        if self.mtp_cache is not None:
            q = self.mtp_cache.offset  # slots 0..q-1 written; h of positions q..len(tokens)-1 pending
            if r < q and r == p:
                r = max(p - 1, 0)  # slot r-1 pairs h_{r-1} with the old token r: must still match
            if r < q:
                self.mtp_cache.trim(q - r)
                self.pending = None
            else:  # all slots valid; pending positions q..r-1 will pair with the new tokens
                self.pending = self.pending[:, : r - q] if r > q else None
        for c in self.cache:
            c.trim(c.offset - r)
        del self.tokens[r:]
        return r

    # --- disk ---------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None):
        """Write atomically (temp file, fsync, rename, fsync the folder) as safetensors with the tokens (and `extra`, JSON) in the metadata."""
        path = Path(path)
        self.settle()
        arrays = {}
        for i, c in enumerate(self.all_caches()):
            for j, a in enumerate(c.state):
                arrays[f"{i}.{j}"] = a
        if self.pending is not None:
            arrays["pending"] = self.pending
        meta = {"tokens": json.dumps(self.tokens), "layers": str(len(self.cache)),
                "mtp": str(int(self.mtp_cache is not None)),
                "indexer": json.dumps([c.has_indexer for c in self.all_caches()]), "extra": json.dumps(extra or {}),
                "kv_bits": str(self.cache[0].kv_bits or 0) if self.cache else "0"}
        tmp = path.with_name(path.name + ".tmp.safetensors")
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        atomic.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, model, mtp: bool) -> "PromptCache":
        try:
            arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)  # any file name
        except Exception as e:  # noqa: BLE001 - mx.load raises bare errors on bad files
            raise PromptCacheError(f"cannot read prompt cache {path}: {str(e).splitlines()[0]}") from None
        pc = cls.fresh(model, mtp=mtp)
        if int(meta.get("layers", -1)) != len(pc.cache):
            raise PromptCacheError(f"prompt cache {path} has {meta.get('layers')} layers, the model {len(pc.cache)}")
        want = (pc.cache[0].kv_bits or 0) if pc.cache else 0
        if int(meta.get("kv_bits", 0)) != want:
            def name(b):
                return f"a {b}-bit KV cache" if b else "an unquantized KV cache"

            raise PromptCacheError(f"prompt cache {path} holds {name(int(meta.get('kv_bits', 0)))}, this model makes "
                                   f"{name(want)} (--kv-bits)")
        pc.tokens = json.loads(meta["tokens"])
        if pc.mtp_cache is not None and meta.get("mtp") != "1":
            pc.mtp_cache = None  # saved without MTP: continue without it would desync; drop MTP here
        for i, c in enumerate(pc.all_caches()):
            state = [arrays[f"{i}.{j}"] for j in range(3 if c.has_indexer else 2) if f"{i}.{j}" in arrays]
            if state:
                try:
                    c.state = state
                except ValueError as e:
                    raise PromptCacheError(f"prompt cache {path}: {e}") from None
        pc.pending = arrays.get("pending")
        pc.extra = json.loads(meta.get("extra", "{}"))
        return pc
