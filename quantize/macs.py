"""Apple Silicon Macs: unified memory, bandwidth, GPU size, and the GPU wired-memory limit.

Naming: `<chip>-<memory GB>` for base chips (m1-16, m4-32) and `<chip>-<tier>-<memory GB>` for
Pro/Max/Ultra (m3-ultra-512, m4-max-128, m1-pro-16), with an optional `-<N>c` GPU-core suffix
(m3-max-96-30c, m4-16-8c). Without the suffix a name means the largest GPU bin sold with that
memory size; the suffix picks a smaller bin where one exists. `get_mac` also takes product names
("Mac Studio M3 Ultra 512GB", "mac-studio-m3-ultra-512", "MacBook Pro M4 Max 128GB",
"iMac M4 24GB", "MacBook Pro M3 Max 36GB 30-core GPU"): the product words (and years, screen
sizes, CPU core counts) are dropped and the chip, memory and GPU cores pick the entry. The
product is not checked against the chip (PRODUCTS is shown by `glm-mlx fit --mac list`).

Sources: memory options and bandwidth of the Pro/Max/Ultra chips from the reference notes
(shared/reference/README.md); which GPU bin comes with which memory (M3 Max 30-core: 36/96 GB,
300 GB/s; 40-core: 48/64/128, 400 GB/s; M4 Max 32-core: 36 GB, 410 GB/s; 40-core: 48/64/128,
546 GB/s), the base chips (M1 68.25 GB/s, 7/8-core GPU, 8/16 GB; M2 100 GB/s, 8/10-core, 8/16/24;
M3 100 GB/s, 8/10-core, 8/16/24; M4 120 GB/s, 8/10-core, 16/24/32; M5 153 GB/s, 10-core,
16/24/32) and the core counts and clocks are Apple's published specs.
Assumed: M5 Pro/Max memory steps below their maximum and their GPU sizes (the notes give only
"up to"); the M5's GPU clock (unpublished; 1.6 GHz like the M5 Pro/Max here); every memory size of
a base chip with either GPU bin (Apple ties some sizes to some products, e.g. the 8-core-GPU iMac
M4 tops out at 24 GB); the 14-core M1 Pro with 32 GB (a build-to-order option). The M5 family's
GPU neural accelerators are not modelled: its prefill estimate uses the plain fp16 ALU peak and
is likely low. Clocks only scale the prefill estimate between chips.

Memory labels are binary (Apple's "512GB" is 512 GiB); bandwidth is decimal GB/s.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass

from glm_mlx.errors import GlmMlxError

GiB, MiB = 1 << 30, 1 << 20

# chip: (GPU clock GHz, [(gpu_cores, bandwidth GB/s, memory sizes GB), ...]) - bins small to large.
CHIPS: dict[str, tuple[float, list[tuple[int, float, tuple[int, ...]]]]] = {
    "m1": (1.278, [(7, 68.25, (8, 16)), (8, 68.25, (8, 16))]),
    "m1-pro": (1.296, [(14, 200, (16, 32)), (16, 200, (16, 32))]),
    "m1-max": (1.296, [(24, 400, (32, 64)), (32, 400, (32, 64))]),
    "m1-ultra": (1.296, [(48, 800, (64, 128)), (64, 800, (64, 128))]),
    "m2": (1.398, [(8, 100, (8, 16, 24)), (10, 100, (8, 16, 24))]),
    "m2-pro": (1.398, [(16, 200, (16, 32)), (19, 200, (16, 32))]),
    "m2-max": (1.398, [(30, 400, (32, 64)), (38, 400, (32, 64, 96))]),
    "m2-ultra": (1.398, [(60, 800, (64, 128, 192)), (76, 800, (64, 128, 192))]),
    "m3": (1.398, [(8, 100, (8, 16, 24)), (10, 100, (8, 16, 24))]),
    "m3-pro": (1.398, [(14, 150, (18,)), (18, 150, (18, 36))]),
    "m3-max": (1.398, [(30, 300, (36, 96)), (40, 400, (48, 64, 128))]),
    "m3-ultra": (1.398, [(60, 819, (96, 256)), (80, 819, (96, 256, 512))]),
    "m4": (1.578, [(8, 120, (16, 24, 32)), (10, 120, (16, 24, 32))]),
    "m4-pro": (1.578, [(16, 273, (24, 48, 64)), (20, 273, (24, 48, 64))]),
    "m4-max": (1.578, [(32, 410, (36,)), (40, 546, (48, 64, 128))]),
    "m5": (1.6, [(10, 153, (16, 24, 32))]),  # assumed clock
    "m5-pro": (1.6, [(20, 307, (24, 48, 64))]),  # assumed bin / sizes (notes: up to 64 GB)
    "m5-max": (1.6, [(40, 614, (48, 64, 128))]),  # assumed bin / sizes (notes: up to 128 GB)
}

# The Macs each chip is sold in (shown by `glm-mlx fit --mac list`; names only, not checked).
PRODUCTS: dict[str, tuple[str, ...]] = {
    "m1": ("MacBook Air", "MacBook Pro", "Mac mini", "iMac"),
    "m1-pro": ("MacBook Pro",),
    "m1-max": ("MacBook Pro", "Mac Studio"),
    "m1-ultra": ("Mac Studio",),
    "m2": ("MacBook Air", "MacBook Pro", "Mac mini"),
    "m2-pro": ("MacBook Pro", "Mac mini"),
    "m2-max": ("MacBook Pro", "Mac Studio"),
    "m2-ultra": ("Mac Studio", "Mac Pro"),
    "m3": ("MacBook Air", "MacBook Pro", "iMac"),
    "m3-pro": ("MacBook Pro",),
    "m3-max": ("MacBook Pro",),
    "m3-ultra": ("Mac Studio",),
    "m4": ("MacBook Air", "MacBook Pro", "Mac mini", "iMac"),
    "m4-pro": ("MacBook Pro", "Mac mini"),
    "m4-max": ("MacBook Pro", "Mac Studio"),
    "m5": ("MacBook Pro",),
    "m5-pro": ("MacBook Pro",),
    "m5-max": ("MacBook Pro",),
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
    wired_limit_mb: int = 0  # this Mac's `sysctl iogpu.wired_limit_mb` when raised; 0: the macOS default

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
    def wired_limit(self) -> int:
        """The GPU wired limit in force: the raised one (this Mac, iogpu.wired_limit_mb) or macOS's default."""
        return self.wired_limit_mb * MiB if self.wired_limit_mb > 0 else self.default_wired_limit

    @property
    def os_reserve(self) -> int:
        return os_reserve(self.memory_bytes)

    @property
    def max_wired_limit(self) -> int:
        """The most we suggest wiring after raising the limit: RAM minus the OS reserve (never below the
        limit in force: on 8 GB Macs the default already leaves less than the reserve)."""
        return max(self.memory_bytes - self.os_reserve, self.wired_limit)

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
    return dict(_catalog())


@functools.cache
def _catalog() -> dict[str, Mac]:
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


def chip_label(chip: str) -> str:
    """"m3-ultra" -> "M3 Ultra"."""
    return " ".join(p.upper() if i == 0 else p.capitalize() for i, p in enumerate(chip.split("-")))


def products(chip: str) -> tuple[str, ...]:
    return PRODUCTS.get(chip, ())


_PRODUCT_WORDS = re.compile(r"\b(?:mac\s*book\s*(?:pro|air)?|mac\s*(?:studio|mini|pro)|imac|apple)\b")


def _name_parts(name: str) -> tuple[str | None, list[str]]:
    """(chip, the other words) of a Mac or product name, e.g. "MacBook Pro M3 Max 36GB 30-core GPU"
    -> ("m3-max", ["36", "30c"]); product words, years, screen sizes and CPU cores are dropped."""
    s = re.sub(r"\(.*?\)", " ", name.lower())
    s = re.sub(r"[-_/,]+", " ", s)
    s = _PRODUCT_WORDS.sub(" ", s)
    s = re.sub(r"\b(?:19|20)\d\d\b", " ", s)  # years
    s = re.sub(r"\b\d+(?:\.\d+)?\s*(?:inch|in\b|\"|”)", " ", s)  # screen sizes
    s = re.sub(r"\b\d+\s*core\s*cpu\b", " ", s)
    s = re.sub(r"\b(\d+)\s*(?:core(?:\s*gpu)?|c)\b", r"\1c", s)
    s = re.sub(r"\b(\d+)\s*(?:gb|g)\b", r"\1", s)
    m = re.search(r"\bm(\d+)\s*(pro|max|ultra)?\b", s)
    if not m:
        return None, s.split()
    chip = f"m{m[1]}" + (f"-{m[2]}" if m[2] else "")
    return chip, (s[:m.start()] + " " + s[m.end():]).split()


def _or(items: list) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _nearest(chip: str, memory: int | None, cores: int | None, n: int = 4) -> list[str]:
    """Catalog names of `chip` nearest to a memory size (bare names, and the bins with `cores`)."""
    cat = _catalog()
    names = [k for k in mac_names() if cat[k].chip == chip and (not k.endswith("c") or k.endswith(f"-{cores}c"))]
    names.sort(key=lambda k: (abs(cat[k].memory_gb - memory) if memory else 0, k.endswith("c")))
    out, seen = [], set()
    for k in names:
        if (cat[k].memory_gb, cat[k].gpu_cores) not in seen:
            seen.add((cat[k].memory_gb, cat[k].gpu_cores))
            out.append(k)
    return out[:n]


def get_mac(name: str) -> Mac:
    """The catalog Mac for a catalog name (m3-ultra-512, m3-max-96-30c) or a product name (see above)."""
    cat = _catalog()
    key = name.strip().lower().replace(" ", "-").replace("gb", "")
    if key in cat:
        return cat[key]
    chip, rest = _name_parts(name)
    mem = [int(w) for w in rest if w.isdigit()]
    cores = [int(w[:-1]) for w in rest if re.fullmatch(r"\d+c", w)]
    if chip in CHIPS and len(mem) <= 1 and len(cores) <= 1 and len(mem) + len(cores) == len(rest):
        want = f"{chip}-{mem[0]}" + (f"-{cores[0]}c" if cores else "") if mem else None
        if want in cat:
            return cat[want]
        bins = CHIPS[chip][1]
        if cores and cores[0] not in [c for c, _, _ in bins]:
            why = f"the {chip_label(chip)} comes with a {_or([f'{c}-core' for c, _, _ in bins])} GPU"
        elif cores:
            sizes = next(m for c, _, m in bins if c == cores[0])
            why = f"the {cores[0]}-core {chip_label(chip)} comes with {_or(sizes)} GB"
        else:
            why = f"the {chip_label(chip)} comes with {_or(sorted({m for _, _, ms in bins for m in ms}))} GB"
        close = _nearest(chip, mem[0] if mem else None, cores[0] if cores else None)
        raise MacError(f"unknown Mac {name!r}: {why}{'' if mem else ' (name the memory)'}; "
                       f"did you mean {', '.join(close)}?")
    if chip and chip not in CHIPS:
        why = f"no {chip_label(chip)} in the catalog (it has {_or([chip_label(c) for c in CHIPS])})"
        raise MacError(f"unknown Mac {name!r}: {why}")
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
