"""Apple Silicon Macs: unified memory, bandwidth, GPU size, and the GPU wired-memory limit.

Naming: `<chip>-<tier>-<memory GB>` (m3-ultra-512, m4-max-128, m1-pro-16), with an optional
`-<N>c` GPU-core suffix (m3-max-96-30c). Without the suffix a name means the largest GPU bin
sold with that memory size; the suffix picks a smaller bin where one exists.

Sources: memory options and bandwidth from the reference notes (shared/reference/README.md);
which GPU bin comes with which memory (M3 Max 30-core: 36/96 GB, 300 GB/s; 40-core: 48/64/128,
400 GB/s; M4 Max 32-core: 36 GB, 410 GB/s; 40-core: 48/64/128, 546 GB/s) and the core counts and
clocks are Apple's published specs. Assumed: M5 Pro/Max memory steps below their maximum and their
GPU sizes (the notes give only "up to"). Clocks only scale the prefill estimate between chips.

Memory labels are binary (Apple's "512GB" is 512 GiB); bandwidth is decimal GB/s.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from glm_mlx.errors import GlmMlxError

GiB, MiB = 1 << 30, 1 << 20

# chip: (GPU clock GHz, [(gpu_cores, bandwidth GB/s, memory sizes GB), ...]) - bins small to large.
CHIPS: dict[str, tuple[float, list[tuple[int, float, tuple[int, ...]]]]] = {
    "m1-pro": (1.296, [(14, 200, (16,)), (16, 200, (16, 32))]),
    "m1-max": (1.296, [(24, 400, (32, 64)), (32, 400, (32, 64))]),
    "m1-ultra": (1.296, [(48, 800, (64, 128)), (64, 800, (64, 128))]),
    "m2-pro": (1.398, [(16, 200, (16, 32)), (19, 200, (16, 32))]),
    "m2-max": (1.398, [(30, 400, (32, 64)), (38, 400, (32, 64, 96))]),
    "m2-ultra": (1.398, [(60, 800, (64, 128, 192)), (76, 800, (64, 128, 192))]),
    "m3-pro": (1.398, [(14, 150, (18,)), (18, 150, (18, 36))]),
    "m3-max": (1.398, [(30, 300, (36, 96)), (40, 400, (48, 64, 128))]),
    "m3-ultra": (1.398, [(60, 819, (96, 256)), (80, 819, (96, 256, 512))]),
    "m4-pro": (1.578, [(16, 273, (24, 48, 64)), (20, 273, (24, 48, 64))]),
    "m4-max": (1.578, [(32, 410, (36,)), (40, 546, (48, 64, 128))]),
    "m5-pro": (1.6, [(20, 307, (24, 48, 64))]),  # assumed bin / sizes (notes: up to 64 GB)
    "m5-max": (1.6, [(40, 614, (48, 64, 128))]),  # assumed bin / sizes (notes: up to 128 GB)
}

# GPU ALUs per core and flops per ALU per clock (FMA): the fp16 peak used to scale prefill.
_ALUS_PER_CORE, _FLOPS_PER_ALU = 128, 2


class MacError(GlmMlxError):
    """An unknown Mac name or an incomplete custom Mac."""

    hint = "Run `glm-mlx fit --mac list` for the catalog, or pass --memory 192GB --bandwidth 800."


@dataclass(frozen=True)
class Mac:
    name: str
    memory_gb: float  # Apple's label, binary GB
    bandwidth_gbs: float
    gpu_cores: int | None = None
    gpu_clock_ghz: float | None = None
    chip: str = "custom"

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GiB)

    @property
    def gpu_flops(self) -> float:
        """fp16 peak; custom Macs without a GPU size borrow the M3 Ultra's ratio to bandwidth."""
        if self.gpu_cores and self.gpu_clock_ghz:
            return self.gpu_cores * _ALUS_PER_CORE * _FLOPS_PER_ALU * self.gpu_clock_ghz * 1e9
        ref = get_mac("m3-ultra-512")
        return ref.gpu_flops * self.bandwidth_gbs / ref.bandwidth_gbs

    @property
    def default_wired_limit(self) -> int:
        return default_wired_limit(self.memory_bytes)

    @property
    def os_reserve(self) -> int:
        return os_reserve(self.memory_bytes)

    @property
    def max_wired_limit(self) -> int:
        """The most we suggest wiring after raising the limit: RAM minus the OS reserve."""
        return self.memory_bytes - self.os_reserve

    @property
    def label(self) -> str:
        gpu = f", {self.gpu_cores}-core GPU" if self.gpu_cores else ""
        return f"{self.name} ({self.memory_gb:g} GB, {self.bandwidth_gbs:g} GB/s{gpu})"


def default_wired_limit(ram: int) -> int:
    """macOS's default GPU wired limit (`recommendedMaxWorkingSetSize`) by RAM size.

    Reference notes: 2/3 of RAM on 16-32 GB machines, 3/4 on 64-96 GB, higher on larger ones.
    Assumed: 36 and 48 GB follow the 3/4 rule; above 96 GB the OS keeps a fixed ~20.5 GiB
    (observed 107.52 GiB of 128 GiB on macOS 26, two machines), i.e. 87.5% of 192 GB and 96% of 512.
    """
    if ram <= 32 * GiB:
        return ram * 2 // 3
    if ram <= 96 * GiB:
        return ram * 3 // 4
    return ram - int(20.48 * GiB)


def os_reserve(ram: int) -> int:
    """RAM we leave to macOS and other apps when suggesting a raised wired limit:
    1/8 of RAM, at least 4 GiB and at most 16 GiB (an assumption; a busy desktop may want more)."""
    return min(max(ram // 8, 4 * GiB), 16 * GiB)


def sysctl_command(limit_bytes: int) -> str:
    """The command that raises the wired limit (macOS 15+; resets on reboot; 0 restores the default)."""
    return f"sudo sysctl iogpu.wired_limit_mb={limit_bytes // MiB}"


def catalog() -> dict[str, Mac]:
    """Every (chip, GPU bin, memory) configuration, keyed by all names that select it."""
    out: dict[str, Mac] = {}
    for chip, (clock, bins) in CHIPS.items():
        sizes = sorted({m for _, _, mems in bins for m in mems})
        for mem in sizes:
            offered = [(c, bw) for c, bw, mems in bins if mem in mems]
            for cores, bw in offered:
                full = f"{chip}-{mem}-{cores}c"
                out[full] = Mac(full, mem, bw, cores, clock, chip)
            cores, bw = offered[-1]  # the bare name is the largest bin
            out[f"{chip}-{mem}"] = Mac(f"{chip}-{mem}", mem, bw, cores, clock, chip)
    return out


def mac_names() -> list[str]:
    """Catalog names by chip generation, memory, then GPU bin (bare name before its bins)."""
    order = list(CHIPS)
    return sorted(catalog(), key=lambda n: (order.index(n.rsplit("-", 2 if n.endswith("c") else 1)[0]),
                                            [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]))


def get_mac(name: str) -> Mac:
    key = name.strip().lower().replace(" ", "-").replace("gb", "")
    cat = catalog()
    if key in cat:
        return cat[key]
    close = difflib.get_close_matches(key, list(cat), n=4, cutoff=0.6)
    tip = f"; did you mean {', '.join(close)}?" if close else ""
    raise MacError(f"unknown Mac {name!r}{tip}")


def custom_mac(memory_gb: float, bandwidth_gbs: float, gpu_cores: int | None = None,
               gpu_clock_ghz: float | None = None) -> Mac:
    if memory_gb <= 0 or bandwidth_gbs <= 0:
        raise MacError(f"a custom Mac needs memory > 0 and bandwidth > 0 (got {memory_gb}, {bandwidth_gbs})")
    return Mac(f"custom-{memory_gb:g}", memory_gb, bandwidth_gbs, gpu_cores, gpu_clock_ghz)


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?)?\s*$", re.I)


def parse_size(text: str, binary_gb: bool = False) -> float:
    """"361GB" -> 361e9 bytes, "336.6GiB" -> bytes, "361" -> GB. With `binary_gb`, "GB" means
    GiB (how Apple labels RAM)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise GlmMlxError(f"cannot read size {text!r}", "Write a size like 361GB, 336.6GiB or 192.")
    value, unit = float(m[1]), (m[2] or "gb").lower()
    power = "kmgt".index(unit[0]) + 1
    binary = "i" in unit or binary_gb
    return value * (1024 if binary else 1000) ** power
