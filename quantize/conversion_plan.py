"""A conversion's plan: the output tensors (items), the shards they are written in, and the plan as a
whole. Its own module so the converter and the output folder's bookkeeping (output_dir.py) both
import it, and neither imports the other for its types."""

from __future__ import annotations

from dataclasses import dataclass, field

from glm_mlx.model.config import ModelArgs

from .formats import Format
from .inventory import Tensor
from .recipe import Recipe


@dataclass
class Item:
    """One output tensor: its format (None = stored unquantized), the arrays it becomes, its sources."""

    t: Tensor
    fmt: Format | None
    arrays: list[tuple[str, str, tuple[int, ...], int]]  # (name, safetensors dtype, shape, bytes)
    sources: list[str]

    @property
    def nbytes(self) -> int:
        return sum(a[3] for a in self.arrays)


@dataclass
class Shard:
    name: str
    items: list[Item]
    header: bytes = b""
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.header) + sum(i.nbytes for i in self.items)


@dataclass
class Plan:
    args: ModelArgs
    recipe: Recipe
    mtp: bool
    dtype: object
    shards: list[Shard]

    @property
    def tensor_bytes(self) -> int:
        return sum(i.nbytes for s in self.shards for i in s.items)

    @property
    def file_bytes(self) -> int:
        return sum(s.size for s in self.shards)
