"""A checkpoint, found once: the folder resolved (a local folder, the Hugging Face cache, or a repo id),
its config read, its weight files listed. Loading, the memory check, the planner, distributed loading
and the CLI are all handed this one value instead of each resolving the path and reading the config
again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..errors import CheckpointError, ConfigError

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _read_json(file: Path, what: str) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {file}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the local folder
    config: dict  # config.json as written
    files: tuple[Path, ...]  # every safetensors shard the folder should hold (the index's, else the folder's)
    weight_map: dict | None = field(default=None, repr=False)  # tensor name -> shard file name, from the index

    @classmethod
    def open(cls, path_or_repo: str | Path | Checkpoint) -> Checkpoint:
        """Resolve and read once; a Checkpoint passes through (callers may take either)."""
        if isinstance(path_or_repo, Checkpoint):
            return path_or_repo
        path = Path(path_or_repo).expanduser()
        if not path.is_dir():  # a repo id: the hub's cache (or a clear error naming what to download)
            from ..hub.download import resolve_model_path

            path = resolve_model_path(path_or_repo)
        cfg = path / "config.json"
        if not cfg.exists():
            raise CheckpointError(f"{path} has no config.json", "Is this a complete checkpoint folder?")
        config = _read_json(cfg, "config")
        index = path / INDEX_FILE
        if index.exists():
            try:
                weight_map = dict(_read_json(index, "weight index")["weight_map"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{index} is unreadable ({e})") from None
            files = tuple(path / f for f in sorted(set(weight_map.values())))
        else:
            weight_map, files = None, tuple(sorted(path.glob("*.safetensors")))
        return cls(path, config, files, weight_map)

    @cached_property
    def args(self):
        """The config's arguments: Glm5NextArgs for GLM-5.3-Flash (glm5_next), else ModelArgs."""
        return config_args(self.config)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / f).exists() for f in TOKENIZER_FILES)

    def shards(self, keep=None) -> list[Path]:
        """The shards holding kept tensor names (all of them without `keep`), each checked to be there:
        a partial download is named, not read."""
        if self.weight_map is not None:
            files = sorted({f for k, f in self.weight_map.items() if keep is None or keep(k)})
            missing = [f for f in files if not (self.path / f).exists()]
            if missing:
                raise CheckpointError(f"missing shard {missing[0]} ({len(missing)} of {len(files)} shards missing) in "
                                      f"{self.path}", "The download is incomplete: re-run glm-mlx download to finish it.")
            return [self.path / f for f in files]
        if not self.files:
            raise CheckpointError(f"no *.safetensors weights in {self.path}",
                                  "Download the weights, or pass the right folder.")
        return list(self.files)

    def tensor_names(self) -> set[str] | None:
        """Every tensor name the index lists (None without an index: the shards' headers tell)."""
        return None if self.weight_map is None else set(self.weight_map)


def config_args(config: dict):
    """A config.json's arguments: Glm5NextArgs for GLM-5.3-Flash (glm5_next; flat or nested under
    text_config), else GLM-5.1's ModelArgs. The one dispatch the loader, the planner and the converter use."""
    from .glm5_next_config import Glm5NextArgs, is_glm5_next

    if is_glm5_next(config):
        return Glm5NextArgs.from_dict(config)
    from .config import ModelArgs

    return ModelArgs.from_dict(config)
