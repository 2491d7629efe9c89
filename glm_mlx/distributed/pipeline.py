"""Pipeline-parallel inference over mx.distributed (ring over TCP, JACCL over Thunderbolt RDMA).

Contiguous layer ranges per rank; hidden states go rank to rank with send/recv; the last rank
holds the final norm, lm_head and the MTP layer, and its logits are shared with every rank
(all_sum), so all ranks run the same Engine control flow and sample the same tokens. Only the
shards holding a rank's tensors are read (through the index), so no machine needs the whole
checkpoint on disk. Started with `mlx.launch` (see `glm-mlx launch`).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn

from ..model.cache import DSACache
from .split import DistributedError, split_layers
from ..model.checkpoint import Checkpoint
from ..model.loading import load_model


def rank_holds(key: str, start: int, end: int, first: bool, last: bool, n_layers: int, mtp: bool) -> bool:
    """Whether a rank holding layers [start, end) loads tensor `key`.

    The first rank holds the embedding; the last the final norm, lm_head, the MTP layer and, with
    MTP, its own copy of the embedding (the MTP layer embeds the draft tokens).
    """
    if key.startswith("model.layers."):
        layer = int(key.split(".")[2])
        return start <= layer < end or (last and mtp and layer >= n_layers)
    if key.startswith("model.embed_tokens."):
        return first or (last and mtp)
    return last  # model.norm, lm_head


class _OffsetOnlyCache(DSACache):
    """The MTP cache on ranks without the MTP layer: tracks positions, holds nothing."""

    @property
    def state(self):
        return []


class _Placeholder(nn.Module):
    """Stands in for a layer another rank holds (keeps layer indices = checkpoint key indices)."""


class NewRequest(Exception):
    """Raised on a follower rank when the leader starts a new request instead of another step."""

    def __init__(self, length: int):
        self.length = length


class PipelineModel:
    """The Model API the Engine uses (__call__, mtp_draft, make_cache, args, has_mtp) for one rank.

    Control protocol: before every model call the ranks all_sum a one-element header. The leader
    (rank 0) sends 1 for "another step" or -n for "a new request of n JSON bytes follows"; so a
    follower that is mid-generation learns that the leader stopped (eos, stop string, Ctrl-C).
    """

    def __init__(self, model, group, ranges):
        self.model, self.group, self.ranges = model, group, ranges
        self.rank, self.size = group.rank(), group.size()
        self.start, self.end = ranges[self.rank]
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.args, self.has_mtp = model.args, model.has_mtp
        self.dtype = model.args_dtype

    def _layers(self):
        return self.model.model.layers[self.start : self.end]

    def make_cache(self, mtp: bool = False) -> list[DSACache]:
        a = self.args
        kv = dict(kv_bits=a.kv_cache_bits, kv_group_size=a.kv_cache_group_size)
        caches = [DSACache(a.has_indexer(i), a.index_cache_bits, **kv) for i in range(self.start, self.end)]
        if mtp and self.has_mtp:
            caches.append(DSACache(True, a.index_cache_bits, **kv) if self.last else _OffsetOnlyCache(True))
        return caches

    def set_kv_cache_bits(self, bits: int | None):
        """As Model.set_kv_cache_bits (every rank sets it: each runs the same command line)."""
        from ..model.glm_moe_dsa import set_kv_cache_bits

        set_kv_cache_bits(self.args, bits)

    def _share(self, logits: mx.array, depends_on=None) -> mx.array:
        """The last rank's float32 logits on every rank."""
        if depends_on is not None:
            logits = mx.depends(logits, depends_on)
        return self._collective(logits.astype(mx.float32))

    def _collective(self, x: mx.array) -> mx.array:
        try:
            out = mx.distributed.all_sum(x, group=self.group)
            mx.eval(out)
        except RuntimeError as e:
            raise DistributedError(f"pipeline rank {self.rank}: {e}") from None
        return out

    def _step_header(self):
        v = self._collective(mx.array([1 if self.rank == 0 else 0], mx.int32)).item()
        if self.rank != 0 and v != 1:
            raise NewRequest(-v)

    def broadcast_request(self, request: dict):
        """Leader: announce a request (JSON) to the followers."""
        data = json.dumps(request).encode()
        self._collective(mx.array([-len(data)], mx.int32))
        self._collective(mx.array(list(data), mx.int32))

    def receive_request(self, length: int | None = None) -> dict:
        """Follower: the next request from the leader."""
        if length is None:
            length = -self._collective(mx.array([0], mx.int32)).item()
        data = self._collective(mx.zeros((length,), mx.int32))
        return json.loads(bytes(data.tolist()).decode())

    def on_generate(self, prompt: list[int], pc, max_tokens: int, engine):
        """Leader hook called by Engine.generate: the followers replay the same call."""
        if self.rank != 0 or self.size == 1:
            return
        if getattr(pc, "key", None) is None:
            PipelineModel._keys = getattr(PipelineModel, "_keys", 0) + 1
            pc.key = PipelineModel._keys
        p = engine.sampler.params
        if p.seed is None and not p.greedy:  # every rank must draw the same random numbers
            engine.sampler.reseed(int(mx.random.randint(0, 2**31 - 1, ()).item()))
        self.broadcast_request({"op": "generate", "key": pc.key, "prompt": prompt, "max_tokens": max_tokens,
                                "mtp": engine.mtp, "num_draft": engine.num_draft,
                                "prefill_step": engine.prefill_step, "sampling": asdict(p)})

    def close(self):
        if self.rank == 0 and self.size > 1:
            self.broadcast_request({"op": "exit"})

    def __call__(self, inputs: mx.array, cache=None, return_hidden: bool = False, last_only: bool = False):
        self._step_header()
        B, L = inputs.shape
        rows = 1 if last_only else L
        D, V = self.args.hidden_size, self.args.vocab_size
        if self.first:
            h = self.model.model.embed_tokens(inputs)
        else:
            h = mx.distributed.recv((B, L, D), self.dtype, self.rank - 1, group=self.group)
        topk = None
        for layer, c in zip(self._layers(), cache or [None] * (self.end - self.start)):
            h, topk = layer(h, c, topk)
        if self.last:
            h = self.model.model.norm(h)
            logits = self._share(self.model.lm_head(h[:, -rows:]))
        else:
            sent = mx.distributed.send(h, self.rank + 1, group=self.group)
            logits = self._share(mx.zeros((B, rows, V), mx.float32), depends_on=sent)
            h = mx.zeros((B, L, 1), self.dtype)  # the hidden state lives on the last rank
        return (logits, h) if return_hidden else logits

    def mtp_draft(self, hidden: mx.array, next_tokens: mx.array, cache: DSACache | None = None, row=None):
        """The MTP layer runs on the last rank; every rank gets the drafting row's logits [B, vocab]."""
        self._step_header()
        B, L = next_tokens.shape
        if self.last:
            logits, h = self.model.mtp_draft(hidden, next_tokens, cache, row)
            return self._share(logits), h
        if cache is not None:
            cache.offset += L  # keep positions in step with the last rank's MTP cache
        return self._share(mx.zeros((B, self.args.vocab_size), mx.float32)), mx.zeros((B, 1, 1), self.dtype)

    @property
    def resident_bytes(self) -> int:
        from mlx.utils import tree_flatten

        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))


def pipeline_load(path, group=None, ranges=None, dtype=None, mtp: bool = True):
    """Load this rank's part of a checkpoint (a folder, repo id or Checkpoint); returns (PipelineModel, path)."""
    group = group or mx.distributed.init()
    ckpt = Checkpoint.open(path)
    args = ckpt.args
    ranges = ranges or split_layers(args, group.size())
    rank, n = group.rank(), group.size()
    start, end = ranges[rank]
    first, last = rank == 0, rank == n - 1
    names = ckpt.tensor_names()  # the index's names; no shard needs to be here
    if names is None:  # single-file checkpoint: its header lists the names (mx.load is lazy)
        names = {k for f in ckpt.shards() for k in mx.load(str(f))}
    mtp_prefix = f"model.layers.{args.num_hidden_layers}."
    has_mtp = mtp and names is not None and any(k.startswith(mtp_prefix) for k in names)

    def keep(key):
        return rank_holds(key, start, end, first, last, args.num_hidden_layers, has_mtp)

    def prune(model):
        layers = model.model.layers
        for i in range(len(layers)):
            if not keep(f"model.layers.{i}.x"):
                layers[i] = _Placeholder()
        if not keep("model.embed_tokens.weight"):
            model.model.embed_tokens = _Placeholder()
        if not last:
            model.model.norm = _Placeholder()
            model.lm_head = _Placeholder()

    model = load_model(ckpt, dtype=dtype, mtp=has_mtp, keep=keep, prune=prune)
    model.args_dtype = dtype or _param_dtype(model)
    return PipelineModel(model, group, ranges), ckpt.path


def _param_dtype(model):
    from mlx.utils import tree_flatten

    for k, v in tree_flatten(model.parameters()):
        if k.endswith("layernorm.weight"):
            return v.dtype
    return mx.bfloat16


def follow(model: PipelineModel):
    """Follower ranks: replay the leader's requests until it says exit."""
    from ..generation.engine import Engine, StepStats
    from ..generation.prompt_cache import PromptCache
    from ..generation.sampling import SamplingParams

    caches: dict[int, PromptCache] = {}
    pending = None
    while True:
        req = model.receive_request(pending)
        pending = None
        if req["op"] == "exit":
            return
        pc = caches.setdefault(req["key"], PromptCache.fresh(model, mtp=req["mtp"]))
        engine = Engine(model, SamplingParams(**req["sampling"]), mtp=req["mtp"], num_draft=req["num_draft"],
                        prefill_step=req["prefill_step"])
        try:
            for _ in engine.generate(req["prompt"], pc, max_tokens=req["max_tokens"], stats=StepStats()):
                pass
            model._step_header()  # the leader's next header is its next request
        except NewRequest as nr:
            pending = nr.length
