"""The machine this process runs on, as a `Mac` the planner can price.

macOS: `sysctl hw.memsize machdep.cpu.brand_string` gives RAM and chip ("Apple M3 Ultra");
`system_profiler SPDisplaysDataType` the GPU core count. The chip, RAM and cores pick the catalog
entry; a chip or size the catalog lacks becomes a custom Mac with the chip's bandwidth.
Elsewhere (Linux, the CPU backend): total RAM from sysconf, as a custom machine; its bandwidth is
a nominal figure, so speeds planned for it are placeholders (memory fits are real).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from typing import Callable

from .macs import CHIPS, GiB, Mac, catalog

NOMINAL_BANDWIDTH_GBS = 100.0  # non-Mac machines: unknown; only speed estimates use it


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout


def parse_chip(brand: str) -> str | None:
    """"Apple M3 Ultra" -> "m3-ultra"; "Apple M4" -> "m4" (a base chip); None if not Apple Silicon."""
    m = re.search(r"Apple (M\d+)(?: (Pro|Max|Ultra))?", brand)
    if not m:
        return None
    return m[1].lower() + (f"-{m[2].lower()}" if m[2] else "")


def parse_gpu_cores(profiler: str) -> int | None:
    m = re.search(r"Total Number of Cores:\s*(\d+)", profiler)
    return int(m[1]) if m else None


def mac_from(memsize: int, brand: str, gpu_cores: int | None) -> Mac:
    """The catalog Mac for these facts, else a custom one (named after the chip when known)."""
    chip, mem = parse_chip(brand), round(memsize / GiB)
    cat = catalog()
    for name in ([f"{chip}-{mem}-{gpu_cores}c"] if gpu_cores else []) + [f"{chip}-{mem}"]:
        if chip and name in cat:
            return cat[name]
    bandwidth = NOMINAL_BANDWIDTH_GBS
    if chip in CHIPS:  # a size the catalog lacks: the chip's largest bin's bandwidth
        bandwidth = CHIPS[chip][1][-1][1]
    label = f"{chip}-{mem}" if chip else f"this-machine-{mem}"
    return Mac(label, memsize / GiB, bandwidth, gpu_cores, None, chip or "custom")


def detect_mac(run: Callable[[list[str]], str] = _run) -> Mac:
    """This machine. `run` is injectable so tests can replay recorded sysctl/system_profiler output."""
    if platform.system() == "Darwin":
        try:
            memsize, brand = _run_lines(run(["sysctl", "-n", "hw.memsize", "machdep.cpu.brand_string"]))
            try:
                cores = parse_gpu_cores(run(["system_profiler", "SPDisplaysDataType"]))
            except (OSError, subprocess.SubprocessError):
                cores = None
            return mac_from(int(memsize), brand, cores)
        except (OSError, subprocess.SubprocessError, ValueError):
            pass  # fall through to the generic reading
    return mac_from(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), platform.processor() or "", None)


def _run_lines(text: str) -> tuple[str, str]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"unexpected sysctl output {text!r}")
    return lines[0], lines[1]
