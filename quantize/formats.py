"""The one format-to-bytes table: how many bytes MLX stores for a weight in each format.

Everything that prices weights (planner, budget solver, converter checks) goes through
`Format.nbytes`, so a converted checkpoint and the prediction agree to the byte.

MLX storage of a quantized [..., out, in] weight (`mx.quantize`, verified in the tests):
  - packed weight: uint32, in * bits / 32 words per row
  - affine: scales and biases, one per group, in the weight's dtype (2 bytes for bf16/fp16)
  - mxfp4 / nvfp4 / mxfp8: one uint8 scale per group (e8m0 or e4m3), no biases
Unquantized formats ("bf16", "f16", "f32") store numel * dtype bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from glm_mlx.errors import GlmMlxError

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
# MLX's microscaling modes: fixed bits and group size.
FP_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
UNQUANTIZED = {"bf16": 16, "f16": 16, "f32": 32}  # mode -> bits per element
_ALIASES = {"fp16": "f16", "float16": "f16", "bfloat16": "bf16", "fp32": "f32", "float32": "f32"}
DEFAULT_AFFINE_GROUP = 64


class FormatError(GlmMlxError):
    """A quantization format name or mlx-lm quantization dict that MLX cannot store."""

    hint = ("Formats: affine<bits>g<group> (bits 2,3,4,5,6,8; group 32,64,128), e.g. affine4g64; "
            "mxfp4, nvfp4, mxfp8; or bf16/f16/f32 for unquantized.")


@dataclass(frozen=True)
class Format:
    """One storage format; modes "bf16", "f16", "f32" are unquantized at `bits` per element."""

    mode: str
    bits: int
    group_size: int | None = None

    @property
    def quantized(self) -> bool:
        return self.mode not in UNQUANTIZED

    @property
    def name(self) -> str:
        if self.mode == "affine":
            return f"affine{self.bits}g{self.group_size}"
        return self.mode

    def __str__(self) -> str:
        return self.name

    def bits_per_weight(self, dtype_bytes: int = 2) -> float:
        """Stored bits per weight including scales (affine 4-bit g64 = 4.5)."""
        n = 4096  # a row length every group size divides
        return 8 * self.nbytes((1, n), dtype_bytes) / n

    def fits(self, shape) -> bool:
        """Whether MLX can quantize a weight of this shape (last dim divisible by the group)."""
        return not self.quantized or (len(shape) >= 2 and shape[-1] % self.group_size == 0)

    def arrays(self, shape, dtype_bytes: int = 2) -> dict[str, tuple[tuple[int, ...], int]]:
        """The arrays MLX stores for one weight of `shape` ([..., out, in]):
        suffix ("weight", "scales", "biases") -> (shape, bytes per element).

        `dtype_bytes` is the model's unquantized dtype (2 for bf16): affine scales/biases take it.
        """
        shape = tuple(shape)
        if not self.quantized:
            return {"weight": (shape, self.bits // 8)}
        if not self.fits(shape):
            raise FormatError(f"{self.name} cannot store shape {shape}: last dim "
                              f"{shape[-1]} is not divisible by group size {self.group_size}")
        lead, cols = shape[:-1], shape[-1]
        groups = lead + (cols // self.group_size,)
        out = {"weight": (lead + (cols * self.bits // 32,), 4)}  # packed uint32 words
        if self.mode == "affine":
            return {**out, "scales": (groups, dtype_bytes), "biases": (groups, dtype_bytes)}
        return {**out, "scales": (groups, 1)}  # uint8 e8m0 / e4m3 scales

    def nbytes(self, shape, dtype_bytes: int = 2) -> int:
        """Exact bytes MLX holds for a weight of `shape` in this format (the sum of `arrays`)."""
        return sum(math.prod(s) * b for s, b in self.arrays(shape, dtype_bytes).values())

    def to_mlx(self) -> dict | bool:
        """The mlx-lm `config["quantization"]` entry: {"group_size","bits","mode"}, or False."""
        if not self.quantized:
            return False
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def unquantized(dtype: str = "bf16") -> Format:
    dtype = _ALIASES.get(dtype, dtype)
    return Format(dtype, UNQUANTIZED[dtype])


_AFFINE_RE = re.compile(r"^(?:affine|q)(\d+)(?:g(\d+))?$")
_FP_RE = re.compile(r"^(mxfp4|nvfp4|mxfp8)(?:g(\d+))?$")


def parse_format(name: str) -> Format:
    """"affine4g64" / "affine4" (group 64) / "q4g32" / "mxfp4" / "nvfp4" / "mxfp8" / "bf16" ..."""
    if isinstance(name, Format):
        return name
    s = str(name).strip().lower().replace("-", "").replace("_", "")
    s = _ALIASES.get(s, s)
    if s in UNQUANTIZED:
        return unquantized(s)
    if m := _AFFINE_RE.match(s):
        bits, group = int(m[1]), int(m[2] or DEFAULT_AFFINE_GROUP)
        return make_format("affine", bits, group, source=name)
    if m := _FP_RE.match(s):
        return make_format(m[1], None, int(m[2]) if m[2] else None, source=name)
    raise FormatError(f"unknown quantization format {name!r}")


def make_format(mode: str, bits: int | None = None, group_size: int | None = None, source=None) -> Format:
    """Validate (mode, bits, group) the way `mx.quantize` does; None picks the mode's default."""
    what = source if source is not None else f"mode={mode} bits={bits} group_size={group_size}"
    mode = (mode or "affine").lower()
    if mode == "affine":
        bits = 4 if bits is None else int(bits)
        group_size = DEFAULT_AFFINE_GROUP if group_size is None else int(group_size)
        if bits not in AFFINE_BITS:
            raise FormatError(f"{what!s}: affine bits must be one of {AFFINE_BITS}")
        if group_size not in AFFINE_GROUPS:
            raise FormatError(f"{what!s}: affine group size must be one of {AFFINE_GROUPS}")
        return Format("affine", bits, group_size)
    if mode in FP_MODES:
        fbits, fgroup = FP_MODES[mode]
        if (bits is not None and int(bits) != fbits) or (group_size is not None and int(group_size) != fgroup):
            raise FormatError(f"{what!s}: {mode} is always {fbits}-bit with group size {fgroup}")
        return Format(mode, fbits, fgroup)
    raise FormatError(f"{what!s}: unknown mode {mode!r} (affine, mxfp4, nvfp4, mxfp8)")


def from_mlx(entry) -> Format | None:
    """Inverse of `Format.to_mlx`: an mlx-lm quantization dict -> Format; False -> None."""
    if entry is False or entry is None:
        return None
    if not isinstance(entry, dict) or "bits" not in entry:
        raise FormatError(f"quantization entry {entry!r} is not a {{'group_size','bits','mode'}} dict")
    return make_format(entry.get("mode", "affine"), entry.get("bits"), entry.get("group_size"))


def all_formats() -> list[Format]:
    """Every quantized format MLX offers (for tests and solvers)."""
    out = [Format("affine", b, g) for b in AFFINE_BITS for g in AFFINE_GROUPS]
    return out + [Format(m, b, g) for m, (b, g) in FP_MODES.items()]
