"""Memory guard: before loading, will weights + planned cache fit the GPU's working set?

Uses only files on disk and the config (no weights are read), so the warning comes before a
multi-hundred-GB load, not after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .model.config import ModelArgs

MB = 1024 * 1024


@dataclass
class MemoryCheck:
    weights_bytes: int
    cache_bytes: int
    limit_bytes: int | None  # the device's recommended working set (None: the backend does not say)
    fits: bool
    message: str

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.cache_bytes


def _device_info() -> dict:
    return mx.device_info() if hasattr(mx, "device_info") else {}


def weights_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def check_memory(path: Path, args: ModelArgs, context: int, dtype_bytes: int = 2, mtp: bool = True) -> MemoryCheck:
    weights = weights_on_disk(path)
    cache = args.cache_bytes_per_token(dtype_bytes, mtp=mtp) * context
    info = _device_info()
    limit = info.get("max_recommended_working_set_size")
    need = weights + cache
    if limit is None or need <= limit:
        msg = f"needs {need / 1e9:.1f} GB" + (f" of a {limit / 1e9:.1f} GB working set" if limit else "")
        return MemoryCheck(weights, cache, limit, True, msg)
    mem = info.get("memory_size") or 0
    # Leave the OS ~8 GB (or 10% on small machines) when raising the wired limit.
    target_mb = int(min(need * 1.05, mem - max(8 * 1024 * MB, mem // 10)) // MB) if mem else int(need * 1.05 // MB)
    fix = (f"raise the GPU wired limit: sudo sysctl iogpu.wired_limit_mb={target_mb}"
           if mem and need * 1.05 < mem - max(8 * 1024 * MB, mem // 10)
           else "use a smaller quantization or context (glm-mlx fit --solve)")
    msg = (f"weights {weights / 1e9:.1f} GB + cache {cache / 1e9:.1f} GB at {context} tokens exceed the GPU working set "
           f"{limit / 1e9:.1f} GB; {fix}")
    return MemoryCheck(weights, cache, limit, False, msg)


def context_that_fits(path: Path, args: ModelArgs, dtype_bytes: int = 2, mtp: bool = True) -> int | None:
    """Tokens of KV cache that fit beside the weights in the GPU working set (None: the backend does not say)."""
    limit = _device_info().get("max_recommended_working_set_size")
    if not limit:
        return None
    return max(0, (limit - weights_on_disk(path)) // args.cache_bytes_per_token(dtype_bytes, mtp=mtp))


def set_wired_limit(check: MemoryCheck) -> bool:
    """Wire what the model needs (up to the recommended limit) where the platform supports it (Metal)."""
    if check.limit_bytes is None or not mx.metal.is_available():
        return False
    mx.set_wired_limit(min(check.needed_bytes, check.limit_bytes))
    return True
