"""The machine this process runs on, as a `Mac` the planner can price.

macOS: `sysctl hw.memsize machdep.cpu.brand_string` gives RAM and chip ("Apple M3 Ultra");
`system_profiler SPDisplaysDataType` the GPU core count. The chip, RAM and cores pick the catalog
entry; a chip or size the catalog lacks becomes a custom Mac with the chip's bandwidth.
`sysctl -n iogpu.wired_limit_mb` is the GPU wired limit in force (0: macOS's default); a raised one
rides on the Mac (`Mac.wired_limit_mb`), so plans for this Mac judge the fit against it.
`detect` also reports the free disk where the model goes (`shutil.disk_usage` of the folder, or of
its nearest existing parent).
Elsewhere (Linux, the CPU backend): total RAM from sysconf, as a custom machine; its bandwidth is
a nominal figure, so speeds planned for it are placeholders (memory fits are real).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
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


def parse_wired_limit(text: str) -> int:
    """`sysctl -n iogpu.wired_limit_mb` -> MiB (0: the default, also for output that is not a number)."""
    m = re.fullmatch(r"\s*(\d+)\s*", text or "")
    return int(m[1]) if m else 0


def mac_from(memsize: int, brand: str, gpu_cores: int | None, wired_limit_mb: int = 0) -> Mac:
    """The catalog Mac for these facts, else a custom one (named after the chip when known); a raised
    GPU wired limit (`wired_limit_mb` > 0) is carried on it."""
    chip, mem = parse_chip(brand), round(memsize / GiB)
    cat = catalog()
    bare, binned = f"{chip}-{mem}", f"{chip}-{mem}-{gpu_cores}c"
    if chip and bare in cat:  # the plain name when it is this GPU bin (m3-ultra-512, not m3-ultra-512-80c)
        name = binned if gpu_cores not in (None, cat[bare].gpu_cores) and binned in cat else bare
        return dataclasses.replace(cat[name], wired_limit_mb=max(wired_limit_mb, 0))
    bandwidth = NOMINAL_BANDWIDTH_GBS
    if chip in CHIPS:  # a size the catalog lacks: the chip's largest bin's bandwidth
        bandwidth = CHIPS[chip][1][-1][1]
    label = f"{chip}-{mem}" if chip else f"this-machine-{mem}"
    return Mac(label, memsize / GiB, bandwidth, gpu_cores, None, chip or "custom", max(wired_limit_mb, 0))


@dataclass(frozen=True)
class ThisMac:
    """What `detect` found: the machine as a Mac, whether it is an Apple Silicon Mac, and the disk."""

    mac: Mac
    is_mac: bool  # macOS on Apple Silicon (a chip the brand string names)
    system: str  # platform.system(): "Darwin", "Linux", ...
    disk_path: str | None = None  # the folder whose disk was measured (the model folder or its nearest parent)
    free_disk_bytes: int | None = None

    @property
    def wired_limit_mb(self) -> int:
        return self.mac.wired_limit_mb

    def to_dict(self) -> dict:
        return {"is_mac": self.is_mac, "system": self.system, "mac": self.mac.name, "memory_gb": self.mac.memory_gb,
                "bandwidth_gbs": self.mac.bandwidth_gbs, "gpu_cores": self.mac.gpu_cores,
                "wired_limit_mb": self.mac.wired_limit_mb, "wired_limit_bytes": self.mac.wired_limit,
                "disk_path": self.disk_path, "free_disk_bytes": self.free_disk_bytes}


def free_disk(folder: str | Path) -> tuple[str, int]:
    """(the folder measured, free bytes) for `folder`, or its nearest existing parent."""
    p = Path(folder).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p), shutil.disk_usage(p).free


def detect(run: Callable[[list[str]], str] = _run, folder: str | Path | None = None) -> ThisMac:
    """This machine (and, given `folder`, the free disk there). `run` is injectable so tests can replay
    recorded sysctl/system_profiler output."""
    system = platform.system()
    disk = free_disk(folder) if folder is not None else (None, None)
    if system == "Darwin":
        try:
            memsize, brand = _run_lines(run(["sysctl", "-n", "hw.memsize", "machdep.cpu.brand_string"]))
            try:
                cores = parse_gpu_cores(run(["system_profiler", "SPDisplaysDataType"]))
            except (OSError, subprocess.SubprocessError):
                cores = None
            try:  # macOS 15+; older systems have no such key (sysctl exits non-zero)
                wired = parse_wired_limit(run(["sysctl", "-n", "iogpu.wired_limit_mb"]))
            except (OSError, subprocess.SubprocessError):
                wired = 0
            mac = mac_from(int(memsize), brand, cores, wired)
            return ThisMac(mac, parse_chip(brand) is not None, system, *disk)
        except (OSError, subprocess.SubprocessError, ValueError):
            pass  # fall through to the generic reading
    mac = mac_from(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), platform.processor() or "", None)
    return ThisMac(mac, False, system, *disk)


def detect_mac(run: Callable[[list[str]], str] = _run) -> Mac:
    """This machine as a Mac (see `detect`)."""
    return detect(run).mac


def _run_lines(text: str) -> tuple[str, str]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"unexpected sysctl output {text!r}")
    return lines[0], lines[1]
