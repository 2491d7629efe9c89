"""Safetensors without loading whole files: headers, row ranges of one tensor, and a shard writer
whose layout is fixed up front (so tensors can be written piece by piece, in any order).

Reading goes through plain file reads at the header's offsets, so memory holds only the rows
asked for; FP8 (float8_e4m3 + `weight_scale_inv` 128x128 block scales) is dequantized per row block.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from glm_mlx import atomic
from glm_mlx.errors import CheckpointError
from glm_mlx.model.checkpoint import INDEX_FILE, Checkpoint
from glm_mlx.model.sanitize import FP8_BLOCK, dequantize_fp8

# safetensors dtype -> (numpy dtype holding the raw bytes, bytes per element)
RAW = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4), "F8_E4M3": (np.uint8, 1),
       "U8": (np.uint8, 1), "U32": (np.uint32, 4), "I32": (np.int32, 4)}
MX_NAME = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint8: "U8", mx.uint32: "U32"}


@dataclass(frozen=True)
class Entry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, Entry]:
    """Tensor entries of one safetensors file; CheckpointError naming the shard if it is damaged."""
    def bad(why):
        return CheckpointError(f"corrupt shard {path.name}: {why}", "Delete the shard and download it again.")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 << 20):
                raise bad("header length is larger than the file")
            meta = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("header is not valid JSON") from None
    except FileNotFoundError:
        raise CheckpointError(f"missing shard {path.name} in {path.parent}") from None
    out = {}
    for name, e in meta.items():
        if name == "__metadata__":
            continue
        try:
            a, b = e["data_offsets"]
            entry = Entry(path.name, e["dtype"], tuple(int(s) for s in e["shape"]), 8 + n + a, 8 + n + b)
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name} is malformed") from None
        if entry.dtype not in RAW:
            raise bad(f"tensor {name} has unsupported dtype {entry.dtype}")
        if entry.end - entry.start != int(np.prod(entry.shape, dtype=np.int64)) * RAW[entry.dtype][1]:
            raise bad(f"tensor {name} has {entry.end - entry.start} bytes for shape {list(entry.shape)}")
        if entry.end > size:
            raise bad(f"truncated ({size:,} bytes, tensor {name} ends at {entry.end:,})")
        out[name] = entry
    return out


def header_digest(path: Path) -> str:
    """sha256 of a safetensors file's header (length prefix and JSON: every tensor's dtype, shape, offsets)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        body = f.read(min(n, 100 << 20))  # a damaged length is named when the shard is read, not here
    return hashlib.sha256(head + body).hexdigest()[:32]


class Source:
    """An HF checkpoint folder (index or *.safetensors); headers are read when a shard is first used."""

    mlx_layout = False  # True: tensors have the converter's output names and shapes (MlxSource)

    def __init__(self, folder: Path, weight_map: dict[str, str] | None = None, config: dict | None = None):
        self.folder = Path(folder)
        self.config = config if config is not None else Checkpoint.open(self.folder).config
        if weight_map is None:
            weight_map = source_weight_map(self.folder)
        self.weight_map = weight_map  # the tensors this source offers
        self.file_map = weight_map  # every stored tensor -> its file (MlxSource: scales and biases too)
        self._headers: dict[str, dict[str, Entry]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def files(self) -> list[str]:
        return sorted(set(self.file_map.values()))

    def header(self, file: str) -> dict[str, Entry]:
        if file not in self._headers:
            self._headers[file] = read_header(self.folder / file)
        return self._headers[file]

    def entry(self, name: str) -> Entry:
        if name not in self.file_map:
            raise CheckpointError(f"missing tensor {name} in {self.folder}", "The checkpoint does not match its config.json.")
        entries = self.header(self.file_map[name])
        if name not in entries:
            raise CheckpointError(f"tensor {name} is not in {self.file_map[name]} as the index says",
                                  "Re-download the checkpoint: its index and shards disagree.")
        return entries[name]

    def forget(self, file: str) -> None:
        self._headers.pop(file, None)

    def files_for(self, name: str) -> set[str]:
        """The files that reading tensor `name` opens (an FP8 weight's scales included)."""
        return {self.weight_map[n] for n in (name, name + "_scale_inv") if n in self.weight_map}

    def _raw(self, name: str, e, a: int, b: int, width: int) -> np.ndarray:
        """Rows [a, b) of `width` elements each, as stored, straight from the shard (a cut-short shard says so)."""
        np_dtype, esize = RAW[e.dtype]
        with open(self.folder / e.file, "rb") as f:
            f.seek(e.start + a * width * esize)
            raw = np.fromfile(f, dtype=np_dtype, count=(b - a) * width)
        if raw.size != (b - a) * width:
            raise CheckpointError(f"corrupt shard {e.file}: tensor {name} is cut short", "Delete the shard and download it again.")
        return raw

    def read(self, name: str, rows: tuple[int, int] | None = None) -> mx.array:
        """float32 rows [a, b) of a tensor (all of it when rows is None), FP8 dequantized."""
        e = self.entry(name)
        a, b = rows or (0, e.shape[0] if e.shape else 1)
        width = int(np.prod(e.shape[1:], dtype=np.int64)) if len(e.shape) > 1 else (1 if e.shape else 1)
        raw = self._raw(name, e, a, b, width)
        shape = ((b - a),) + e.shape[1:] if e.shape else ()
        arr = mx.array(raw).reshape(shape)
        if e.dtype == "BF16":
            arr = arr.view(mx.bfloat16)
        elif e.dtype == "F8_E4M3":
            scale = self.weight_map.get(name + "_scale_inv") and self.read(name + "_scale_inv")
            if scale is None:
                return mx.from_fp8(arr, dtype=mx.float32)
            if a % FP8_BLOCK:
                raise ValueError("FP8 row blocks must start at a multiple of 128")
            return dequantize_fp8(arr, scale[a // FP8_BLOCK: -(-b // FP8_BLOCK)])
        return arr.astype(mx.float32)


class MlxSource(Source):
    """An MLX-quantized checkpoint (config.json "quantization", as glm-mlx convert and mlx-lm write it), read
    dequantized: its tensors already have the output's names and shapes (stacked experts, embed_q /
    unembed_out), and `read` returns float32 rows of a quantized weight through `mx.dequantize`.

    `weight_map` lists the logical tensors (X.weight, not X.scales / X.biases); rows are counted over all
    leading dims (expert e's row r of a [E, out, in] weight is row e * out + r)."""

    mlx_layout = True

    def __init__(self, folder: Path, weight_map: dict[str, str] | None = None, config: dict | None = None):
        super().__init__(folder, weight_map, config)
        self.quantization = self.config.get("quantization") or {}
        self.quantized = {k.rsplit(".", 1)[0] for k in self.file_map
                          if k.endswith(".scales") and k.rsplit(".", 1)[0] + ".weight" in self.file_map}
        self.weight_map = {k: v for k, v in self.file_map.items()
                           if not (k.endswith((".scales", ".biases")) and k.rsplit(".", 1)[0] in self.quantized)}

    def files_for(self, name: str) -> set[str]:
        module = name.rsplit(".", 1)[0]
        names = [name] + ([module + ".scales", module + ".biases"] if module in self.quantized else [])
        return {self.file_map[n] for n in names if n in self.file_map}

    def _rows(self, name: str, rows: tuple[int, int] | None) -> mx.array:
        """Rows [a, b) over all leading dims, [b - a, last dim], in the stored dtype (all of it, shaped, if None)."""
        e = self.entry(name)
        width = e.shape[-1] if e.shape else 1
        a, b = rows or (0, int(np.prod(e.shape[:-1], dtype=np.int64)) if len(e.shape) > 1 else 1)
        raw = self._raw(name, e, a, b, width)
        arr = mx.array(raw).reshape(e.shape if rows is None else (b - a, width))
        return arr.view(mx.bfloat16) if e.dtype == "BF16" else arr

    def format_of(self, module: str):
        """(mode, bits, group size) of a quantized module: its own entry in config "quantization", else the
        global one; checked against the shapes of its packed weight and scales."""
        from .formats import FormatError, make_format

        entry = self.quantization.get(module)
        entry = entry if isinstance(entry, dict) else self.quantization
        try:
            fmt = make_format(entry.get("mode", "affine"), entry.get("bits"), entry.get("group_size"))
        except FormatError as err:
            raise CheckpointError(f"config.json quantization of {module}: {err}",
                                  "The checkpoint's config.json does not describe its weights.") from None
        words, groups = self.entry(module + ".weight").shape[-1], self.entry(module + ".scales").shape[-1]
        if words * 32 != groups * fmt.group_size * fmt.bits or (fmt.mode == "affine") != (module + ".biases" in self.file_map):
            raise CheckpointError(f"{module} is stored as {words} packed words and {groups} scales per row, which is not "
                                  f"{fmt.name} as config.json says", "The checkpoint's config.json does not describe its weights.")
        return fmt

    def read(self, name: str, rows: tuple[int, int] | None = None) -> mx.array:
        """float32 rows [a, b) (over all leading dims) of a tensor, dequantized; all of it, shaped, if None."""
        module = name.rsplit(".", 1)[0]
        if not (name.endswith(".weight") and module in self.quantized):
            return self._rows(name, rows).astype(mx.float32)
        fmt = self.format_of(module)
        w, scales = self._rows(name, rows), self._rows(module + ".scales", rows)
        biases = None
        if fmt.mode == "affine":  # in float32, rounded once to the output dtype: what a float32 model computes with
            scales, biases = scales.astype(mx.float32), self._rows(module + ".biases", rows).astype(mx.float32)
        out = mx.dequantize(w, scales, biases, group_size=fmt.group_size, bits=fmt.bits, mode=fmt.mode)
        return out.astype(mx.float32)


def quantization_kind(config: dict) -> str | None:
    """How a checkpoint's weights are quantized: "mlx" (config "quantization"), "fp8" (HF quantization_config
    with quant_method fp8), another quant_method's name, or None (not quantized)."""
    if config.get("quantization"):
        return "mlx"
    qc = config.get("quantization_config")
    return str(qc.get("quant_method") or "unknown") if isinstance(qc, dict) else None


def open_source(folder, weight_map: dict[str, str] | None = None) -> Source:
    """A checkpoint (folder or Checkpoint) as a Source: an MLX-quantized one dequantizes as it reads (MlxSource)."""
    ckpt = Checkpoint.open(folder)
    cls = MlxSource if quantization_kind(ckpt.config) == "mlx" else Source
    return cls(ckpt.path, weight_map, ckpt.config)


def source_weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index or (no index) from the shards' headers."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is unreadable ({e})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}", "Pass the folder of an HF checkpoint.")
    return {name: f.name for f in files for name in read_header(f)}


# --- writing -------------------------------------------------------------------------------------------
def layout(arrays: list[tuple[str, str, tuple[int, ...], int]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(name, dtype, shape, nbytes) in file order -> (the header bytes incl. its length prefix,
    name -> absolute (start, end)). Deterministic: same arrays, same bytes."""
    meta, offsets, pos = {"__metadata__": {"format": "mlx"}}, {}, 0
    for name, dtype, shape, nbytes in arrays:
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = (pos, pos + nbytes)
        pos += nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    head = struct.pack("<Q", len(text)) + text
    return head, {k: (len(head) + a, len(head) + b) for k, (a, b) in offsets.items()}


class ShardWriter:
    """Writes one shard to `<final>.tmp` at planned offsets; `finish` syncs and renames it."""

    def __init__(self, final: Path, header: bytes, size: int):
        self.final, self.tmp = final, final.with_name(final.name + ".tmp")
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, header, 0)
        os.ftruncate(self.fd, size)

    def write(self, offset: int, arr: mx.array) -> int:
        data = memoryview(np.ascontiguousarray(_raw(arr))).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)
        return done

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        atomic.replace(self.tmp, self.final, synced=True)  # a shard under its final name is complete, and stays

    def abort(self) -> None:
        os.close(self.fd)


def _raw(arr: mx.array) -> mx.array:
    """The same bytes as a dtype numpy can hold (bfloat16 -> uint16)."""
    return arr.view(mx.uint16) if arr.dtype == mx.bfloat16 else arr
