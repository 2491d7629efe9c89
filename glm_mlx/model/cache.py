"""Per-layer caches for GLM-MoE-DSA.

Each decoder layer caches its compressed latent KV (kv_lora_rank latent + qk_rope_head_dim rope
key, a single "head" shared by all heads: that is what MLA saves), stored side by side as one
[B, 1, T, C+R] row per token so sparse attention gathers each selected key with one row read and
scores it with one matmul; and, only on layers with their
own indexer, the indexer keys (index_head_dim per token, in the model dtype, or with
`index_cache_bits=8` as packed 8-bit codes plus a float32 scale and bias per key). Shared-indexer
layers (GLM-5.2) reuse an earlier layer's top-k and keep no indexer keys.

With `kv_bits` (8 or 4; ModelArgs.kv_cache_bits) the latent is stored quantized (mx.quantize, one
scale and bias per `kv_group_size` values, in the model dtype) and the rope key as it is: four
[B, 1, T, .] buffers (codes, scales, biases, rope keys), read back as a `QuantizedKV`. The rope key
stays exact: it is qk_rope_head_dim / (kv_lora_rank + qk_rope_head_dim) of the row (64 of 576 in
GLM-5.1), carries the position signal of every score, and is too narrow for a quantization group
in small models (16 in glm-mini).

Why not mlx-lm's KVCache/CacheList: those report the bytes of their whole pre-allocated buffer
and need a values tensor for every cache; here `nbytes` must be the bytes held for the cached
tokens (the planner's analytic figure), and the indexer cache has keys only. Growth follows
mlx-lm's KVCache (256-token steps) so decode does not reallocate every token.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

GROWTH_STEP = 256  # tokens: buffers hold a multiple of this (the planner prices the rounding)


class _GrowingBuffer:
    """A [B, 1, T, D] array that grows along T in fixed steps (like mlx-lm's KVCache)."""

    step = GROWTH_STEP

    def __init__(self):
        self.data: mx.array | None = None

    def write(self, offset: int, x: mx.array) -> mx.array:
        """Write x ([B, 1, L, D]) at [offset, offset+L) and return the valid prefix [B, 1, offset+L, D]."""
        end = offset + x.shape[2]
        if self.data is None or end > self.data.shape[2]:
            B, H, _, D = x.shape
            grown = mx.zeros((B, H, -(-end // self.step) * self.step, D), x.dtype)
            if self.data is not None and offset:
                grown[..., :offset, :] = self.data[..., :offset, :]
            self.data = grown
        self.data[..., offset:end, :] = x
        return self.data[..., :end, :]

    def valid(self, n: int) -> mx.array:
        return self.data[..., :n, :]

    def bytes_for(self, n: int) -> int:
        if self.data is None or n == 0:
            return 0
        return n * self.data.shape[0] * self.data.shape[1] * self.data.shape[3] * self.data.dtype.size

    @property
    def reserved_bytes(self) -> int:
        return 0 if self.data is None else self.data.nbytes


class QuantizedKV:
    """Cached rows of a quantized latent KV cache: codes [.., C*bits/32] uint32, scales and biases
    [.., C/group] and rope keys [.., R] in the model dtype, all with the same leading dims
    ([B, 1, T] as the cache returns them, [B, Lc, k] once gathered)."""

    def __init__(self, codes, scales, biases, rope, bits: int, group_size: int):
        self.codes, self.scales, self.biases, self.rope = codes, scales, biases, rope
        self.bits, self.group_size = bits, group_size

    @property
    def parts(self) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        return self.codes, self.scales, self.biases, self.rope

    @property
    def length(self) -> int:  # T: the rows along axis 2 of the cache's [B, 1, T, .] arrays
        return self.rope.shape[2]

    @property
    def dtype(self):  # the model dtype (of the rope keys, the scales and the dequantized latent)
        return self.rope.dtype

    def latent(self) -> mx.array:
        """The dequantized latent [.., C] in the model dtype."""
        return mx.dequantize(self.codes, self.scales, self.biases, group_size=self.group_size, bits=self.bits)

    def rows(self) -> mx.array:
        """Dequantized rows [.., C+R], as an unquantized cache holds them."""
        return mx.concatenate([self.latent(), self.rope], axis=-1)

    def take(self, rows: mx.array) -> "QuantizedKV":
        """Gather rows of the flattened cache: [B, 1, T, .] parts indexed by rows (into B*T) -> rows.shape + (.,)."""
        def gather(a):
            return mx.take(a.reshape(-1, a.shape[-1]), rows, axis=0)

        return QuantizedKV(*(gather(a) for a in self.parts), self.bits, self.group_size)


def quantize_latent(latent: mx.array, k_pe: mx.array, bits: int, group_size: int) -> tuple[mx.array, ...]:
    """[.., C] latents, [.., R] rope keys -> the four stored parts (codes, scales, biases, rope keys)."""
    return (*mx.quantize(latent, group_size=group_size, bits=bits), k_pe)


class DSACache(_BaseCache):
    """One layer's cache: latent KV + rope key, and indexer keys when the layer has an indexer."""

    def __init__(self, has_indexer: bool, index_bits: int | None = None, kv_bits: int | None = None,
                 kv_group_size: int = 64):
        self.has_indexer = has_indexer
        self.index_bits = index_bits if has_indexer else None
        self.kv_bits = kv_bits or None
        self.kv_group_size = kv_group_size
        self.offset = 0
        self.latent_dim = 0  # C: the latent is kv[..., :C], the rope key kv[..., C:]
        # One [C+R] buffer; or (codes, scales, biases, rope keys) with kv_bits.
        self._kv = [_GrowingBuffer() for _ in range(4 if self.kv_bits else 1)]
        # One buffer for plain keys; (codes, scales, biases) for 8-bit keys.
        self._index = [_GrowingBuffer() for _ in range(3 if self.index_bits else 1)] if has_indexer else []

    # Attention writes its latents first, then the indexer writes its keys, for the same tokens.
    def update_kv(self, latent: mx.array, k_pe: mx.array):
        """Append [B,1,L,kv_lora] latents and [B,1,L,rope] keys; return all cached rows [B,1,T,C+R]
        (a QuantizedKV of them with kv_bits)."""
        self.latent_dim = latent.shape[-1]
        if self.kv_bits:
            parts = quantize_latent(latent, k_pe, self.kv_bits, self.kv_group_size)
            kv = QuantizedKV(*(b.write(self.offset, p) for b, p in zip(self._kv, parts)),
                             self.kv_bits, self.kv_group_size)
        else:
            kv = self._kv[0].write(self.offset, mx.concatenate([latent, k_pe], axis=-1))
        self.offset += latent.shape[2]
        return kv

    def update_latent(self, latent: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array]:
        """As update_kv, split: ([B,1,T,kv_lora] latents (dequantized with kv_bits), [B,1,T,rope] keys)."""
        kv = self.update_kv(latent, k_pe)
        if isinstance(kv, QuantizedKV):
            return kv.latent(), kv.rope
        return kv[..., : self.latent_dim], kv[..., self.latent_dim :]

    def kv_parts(self, n: int | None = None) -> list[mx.array]:
        """The first n (default: all cached) rows of each latent-KV buffer, as stored."""
        n = self.offset if n is None else n
        return [b.valid(n) for b in self._kv]

    def buffers(self) -> list[mx.array]:
        """Every allocated buffer (to evaluate after a restore)."""
        return [b.data for b in self._kv + self._index if b.data is not None]

    def update_index(self, keys):
        """Append [B,1,L,index_head_dim] indexer keys (or their 8-bit (codes, scales, biases)) for the
        tokens just added by update_latent; return all cached keys in the same form."""
        parts = keys if isinstance(keys, tuple) else (keys,)
        if len(parts) != len(self._index):
            raise ValueError(f"indexer keys in {len(parts)} parts, cache built for {len(self._index)}")
        start = self.offset - parts[0].shape[2]
        out = tuple(b.write(start, p) for b, p in zip(self._index, parts))
        return out if isinstance(keys, tuple) else out[0]

    # --- what batching and the prefix cache ask of every cache family (see glm5_next_cache.KDACache) ---
    batch_kind = "kv"  # which batch cache holds its rows (batch/layers.py)
    block_layout = "rows"  # a prefix block holds its state's rows [s, e) (axis 2 is tokens)

    def row_state(self) -> list[mx.array]:
        """The arrays whose axis 2 is tokens (a prefix block holds their rows)."""
        return self.state

    def keep_boundaries(self, every: int | None, phase: int = 0, sparse: int = 1, pin: int | None = None):
        """Rows are the state at any boundary: nothing to keep."""

    def can_trim_to(self, offset: int) -> bool:
        return 0 <= offset <= self.offset

    # --- mlx-lm cache protocol ---------------------------------------------------------------
    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        """Bytes held for the cached tokens (what the planner predicts per token)."""
        return sum(b.bytes_for(self.offset) for b in self._kv + self._index)

    @property
    def reserved_nbytes(self) -> int:
        """Bytes actually allocated (rounded up to the 256-token growth step)."""
        return sum(b.reserved_bytes for b in self._kv + self._index)

    @property
    def state(self):
        """[latent, rope keys] + [indexer keys] on indexer layers. A quantized latent travels as one
        uint32 array [B, 1, T, C*bits/32 + (2C/group) * dtype bytes / 4] (codes, then the scales' and
        biases' bit patterns); 8-bit indexer keys as one uint32 array [B, 1, T, D/4 + 2] (codes, then
        the scale and bias bit patterns), so savers always see 2 or 3 arrays."""
        if not self.offset:
            return []
        if self.kv_bits:
            codes, scales, biases, rope = self.kv_parts()
            arrays = [mx.concatenate([codes, mx.view(mx.concatenate([scales, biases], axis=-1), mx.uint32)], axis=-1),
                      rope]
        else:
            kv = self._kv[0].valid(self.offset)
            arrays = [kv[..., : self.latent_dim], kv[..., self.latent_dim :]]
        index = [b.valid(self.offset) for b in self._index]
        if len(index) == 3:
            codes, scales, biases = index
            index = [mx.concatenate([codes, mx.view(scales, mx.uint32), mx.view(biases, mx.uint32)], axis=-1)]
        return arrays + index

    @state.setter
    def state(self, arrays):
        if (arrays[0].dtype == mx.uint32) != bool(self.kv_bits):
            raise ValueError("latent KV cache format mismatch: saved with a different kv_cache_bits")
        if self.kv_bits:
            self._set_quantized(arrays[0], arrays[1])
        else:
            self.latent_dim = arrays[0].shape[-1]
            self._kv[0].data = mx.concatenate([arrays[0], arrays[1]], axis=-1)
        if self._index and (arrays[2].dtype == mx.uint32) != (len(self._index) == 3):
            raise ValueError("indexer cache format mismatch: saved with a different index_cache_bits")
        if len(self._index) == 1:
            self._index[0].data = arrays[2]
        elif self._index:
            packed = arrays[2]  # [B, 1, T, D/4 + 2] uint32
            parts = (packed[..., :-2], mx.view(packed[..., -2:-1], mx.float32), mx.view(packed[..., -1:], mx.float32))
            for b, p in zip(self._index, parts):
                b.data = mx.contiguous(p)
        self.offset = arrays[0].shape[2]

    def _set_quantized(self, packed: mx.array, rope: mx.array):
        """Split a packed latent (see `state`) back into codes, scales and biases; the scales are in
        the rope keys' dtype (both are the model dtype)."""
        bits, g, size = self.kv_bits, self.kv_group_size, rope.dtype.size
        # A group of g latent values: g*bits/32 words of codes and a scale and a bias of `size` bytes.
        per_group = g * bits // 32 + 2 * size // 4
        width = packed.shape[-1]
        if width % per_group:
            raise ValueError(f"latent KV cache format mismatch: saved with a different kv_cache_bits ({width} words "
                             f"per token are no {bits}-bit groups of {g})")
        groups = width // per_group
        words = groups * g * bits // 32
        sb = mx.view(mx.contiguous(packed[..., words:]), rope.dtype)  # [.., 2 * groups]
        parts = (packed[..., :words], sb[..., :groups], sb[..., groups:], rope)
        for b, p in zip(self._kv, parts):
            b.data = mx.contiguous(p)
        self.latent_dim = groups * g

    @property
    def meta_state(self):
        return f"{int(self.has_indexer)},{self.index_bits or 0},{self.kv_bits or 0},{self.kv_group_size}"

    @meta_state.setter
    def meta_state(self, v):
        has, bits, kv_bits, group = (str(v).split(",") + ["0", "0", "64"])[:4]
        self.has_indexer = bool(int(has))
        self.index_bits = int(bits or 0) or None
        self.kv_bits = int(kv_bits or 0) or None
        self.kv_group_size = int(group or 64)
        if len(self._kv) != (4 if self.kv_bits else 1):
            self._kv = [_GrowingBuffer() for _ in range(4 if self.kv_bits else 1)]
