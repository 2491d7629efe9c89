"""`convert --stream`: fetch the source from the Hub one shard at a time while converting.

The small files (config, index, tokenizer) come first, so the whole conversion is planned before any
weight is fetched. Then, for each output shard, the source shards it reads are downloaded (resumably,
through glm_mlx.hub.download) and, once no later output shard needs them, deleted: peak disk use is the output
plus the few source shards in flight, not the whole source. An interrupted run resumes like any
conversion: finished output shards are skipped (their sources are never fetched again) and a partial
source download continues where it stopped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from glm_mlx.hub import download as hub
from glm_mlx.disk import fmt_bytes
from glm_mlx.model.checkpoint import INDEX_FILE

from .conversion_plan import Shard
from .converter import TOKENIZER_FILES, ConvertError, shard_sources
from .source import open_source

SOURCE_DIR = ".glm-mlx-source"  # inside the output folder; removed when the conversion finishes


class HubFetcher:
    def __init__(self, repo_id: str, dst: Path, revision: str | None = None, progress: bool = True):
        from huggingface_hub import HfApi

        self.repo_id, self.progress = repo_id, progress
        self.folder = Path(dst).expanduser() / SOURCE_DIR
        with hub.hub_errors(repo_id, revision):
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        self.commit = info.sha
        self.sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size or 0) for s in info.siblings or []}
        if "config.json" not in self.sizes:
            raise ConvertError(f"{repo_id} has no config.json", "Is this a model repository?")
        small = ["config.json"] + [f for f in (INDEX_FILE, *TOKENIZER_FILES) if f in self.sizes]
        weights = sorted(f for f in self.sizes if f.endswith(".safetensors"))
        if not weights:
            raise ConvertError(f"{repo_id} has no *.safetensors weights", "Only safetensors checkpoints can be converted.")
        # Without an index the tensor names are only in the shards' headers: fetch them all up front.
        self._download(small if INDEX_FILE in self.sizes else small + weights)
        self.source = open_source(self.folder)  # an MLX-quantized repo reads dequantized (--dequantize)
        self.origin = {"repo": repo_id, "commit": self.commit,
                       "files": {f: self.sizes[f] for f in self.source.files()}}

    def _download(self, files: list[str], log=None) -> None:
        todo = [f for f in files if not ((self.folder / f).is_file() and (self.folder / f).stat().st_size == self.sizes[f])]
        if not todo:
            return
        if log:
            log(f"fetching {', '.join(todo)} ({fmt_bytes(sum(self.sizes[f] for f in todo))}) from {self.repo_id}")
        hub.download_repo(self.repo_id, revision=self.commit, include=todo, local_dir=self.folder, progress=False)

    def peak_bytes(self, todo: list[Shard]) -> int:
        """Most source bytes on disk at once while writing `todo` (what ensure/release will hold)."""
        held, peak = set(), 0
        needs = [shard_sources(s, self.source) for s in todo]
        for i, need in enumerate(needs):
            held |= need
            peak = max(peak, sum(self.sizes[f] for f in held if not (self.folder / f).exists()))
            held -= need - set().union(*needs[i + 1:])
        return peak

    def ensure(self, files: set[str], log=None) -> None:
        self._download(sorted(files), log)

    def release(self, files: set[str]) -> None:
        for f in files:
            (self.folder / f).unlink(missing_ok=True)
            self.source.forget(f)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
