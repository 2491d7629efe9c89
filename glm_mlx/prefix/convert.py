"""A prefix cache's MLX <-> numpy work (the caller's thread only): copying blocks out of a PromptCache and
building a PromptCache back from blocks, for both ways a layer cache holds a block (its `block_layout`):

  * "rows" (GLM-5.1's DSACache, GLM-5.3-Flash's PooledDSACache): the rows [s, e) of each array of its
    `row_state()` (axis 2 is tokens); restored by concatenating the blocks' rows.
  * "boundary" (GLM-5.3-Flash's KDACache, a fixed-size recurrent state): its state (conv, recurrent)
    after e - 1 tokens, where a restore of the blocks up to e ends (one token before the block's end:
    the restore leaves that token to process, for its logits and its MTP slot). The cache keeps those
    states as its prefill and decoding pass them (`keep_boundaries`), only where a block will carry one
    (prefix/cache.py: every `state_every` blocks and a saved prompt's last block); a block carries the
    states of all recurrent layers or of none (a hit for such a model ends at a block that carries them).
    Restored from the last block's state alone.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .block_file import STATE_ARRAYS, Block


def layer_names(cache, i: int) -> list[str]:
    if cache.block_layout == "boundary":
        return [f"layer.{i}.{a}" for a in STATE_ARRAYS]
    return [f"layer.{i}.{j}" for j in range(2 + cache.has_indexer)]


def _host(arrays: list[mx.array]) -> tuple[list[np.ndarray], list[bool]]:
    """Evaluated MLX arrays -> numpy views (bfloat16 as uint16 bits) and which were bfloat16."""
    regions = [mx.view(a, mx.uint16) if a.dtype == mx.bfloat16 else a for a in arrays]
    mx.eval(regions)
    return [np.asarray(r) for r in regions], [a.dtype == mx.bfloat16 for a in arrays]


def with_states(pc, want: list[int], B: int) -> set[int]:
    """The blocks of `want` whose boundary states every "boundary" layer of pc kept (all of them when
    pc has no such layer: nothing to carry)."""
    kept = [c for c in pc.cache if c.block_layout == "boundary"]
    return {j for j in want if all(c.boundary_state((j + 1) * B - 1) is not None for c in kept)}


def slice_blocks(pc, names: list[list[str]], mtp_names: list[str], new: list[int], keys: list[bytes], root: bytes,
                 B: int, tick: float, states: set[int] = frozenset()) -> list[Block]:
    """Copy blocks `new` out of pc's caches into numpy, one layer at a time (each layer's rows covering
    them evaluated once, viewed without a copy, then copied per block); the blocks in `states` carry the
    recurrent layers' boundary states too."""
    lo, hi = new[0] * B, (new[-1] + 1) * B
    arrays: list[dict] = [{} for _ in new]
    raw: list[dict] = [{} for _ in new]

    def take(state, names, a0, a1, rows):  # rows(j) -> (start, end) in absolute positions
        views, bf16 = _host([a[..., a0:a1, :] for a in state])
        for name, view, is_bf16 in zip(names, views, bf16):
            for i, j in enumerate(new):
                s, e = rows(j)
                arrays[i][name] = np.array(view[:, :, s - a0 : e - a0], order="C")  # its own copy (exact RAM bound)
                if is_bf16:
                    raw[i][name] = "bfloat16"
        del views

    for c, ns in zip(pc.cache, names):
        if c.block_layout == "boundary":
            for i, j in enumerate(new):
                if j not in states:
                    continue
                views, bf16 = _host(c.boundary_state((j + 1) * B - 1))
                for name, view, is_bf16 in zip(ns, views, bf16):
                    arrays[i][name] = np.array(view, order="C")  # its own copy, C-ordered (what the file holds)
                    if is_bf16:
                        raw[i][name] = "bfloat16"
            continue
        state = c.row_state()
        if len(state) != len(ns):
            raise ValueError(f"a layer cache holds {len(state)} arrays, expected {len(ns)}")
        take(state, ns, lo, hi, lambda j: (j * B, (j + 1) * B))
    if pc.mtp_cache is not None:
        state = pc.mtp_cache.row_state() if pc.mtp_cache.offset else []
        if len(state) != len(mtp_names):
            raise ValueError(f"the MTP cache holds {len(state)} arrays, expected {len(mtp_names)}")
        take(state, mtp_names, max(lo - 1, 0), hi - 1, lambda j: (max(j * B - 1, 0), (j + 1) * B - 1))
    ids = np.asarray(pc.tokens[:hi], dtype=np.int32)
    return [Block(key=keys[j], parent=keys[j - 1] if j else root, depth=j,
                  tokens=ids[j * B : (j + 1) * B].copy(), arrays=arrays[i], raw=raw[i], tick=tick)
            for i, j in enumerate(new)]


def build_cache(pc, blocks: list[Block], names: list[list[str]], mtp_names: list[str], B: int):
    """Fill a fresh PromptCache's caches from k blocks: k*B - 1 tokens each (the last row trimmed, the
    recurrent state the one kept there)."""

    def arrays_of(ns, bs):
        out = []
        for name in ns:
            a = mx.array(np.concatenate([b.arrays[name] for b in bs], axis=2) if len(bs) > 1 else bs[0].arrays[name])
            dt = bs[0].raw.get(name)
            out.append(mx.view(a, getattr(mx, dt)) if dt else a)
        return out

    n = len(blocks) * B - 1
    for c, ns in zip(pc.cache, names):
        if c.block_layout == "boundary":
            if not blocks[-1].state:
                raise ValueError("a restore of a recurrent model must end at a block that carries its states")
            c.restore_boundary(arrays_of(ns, blocks[-1:]), n)
            mx.eval(c.state)
            continue
        c.state = arrays_of(ns, blocks)
        mx.eval(c.buffers() or c.state)  # one layer at a time: small peak
        c.trim(1)  # the next forward recomputes position kB-1 (and writes its MTP slot)
    if pc.mtp_cache is not None:
        pc.mtp_cache.state = arrays_of(mtp_names, blocks)
        mx.eval(pc.mtp_cache.buffers() or pc.mtp_cache.state)
