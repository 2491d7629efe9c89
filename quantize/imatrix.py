"""Importance matrix: the mean squared input activation of every quantizable weight's input channels.

imp[module] is mean(x_j^2) over the calibration tokens that reach the module ([in]); for the stacked
routed experts it is per expert ([E, in]), over the tokens routed to that expert; for the MultiLinear
attention weights it is per head ([H, in]). Because embed_q is only sometimes called on its own input
(the expanded prefill path multiplies the latent by it instead), its input - the "nope" part of the
queries - is taken from q_b_proj's output.

Defaults (recorded in `defaults`): an expert that no calibration token was routed to gets the pooled
importance of the experts of its layer that were (for gate/up, whose input is the same hidden state
for every expert, the shared expert's input importance when no expert was routed at all); the
embedding table is looked up, not multiplied, so it gets uniform importance.

`calibrate` runs the model one decoder layer at a time from an HF checkpoint (only one layer's weights
are in memory), exactly as GlmModel runs it, with recorders wrapped around that layer's linear
modules; `collect` does the same on a model already in memory and restores its modules afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.switch_layers import SwitchLinear

from glm_mlx import atomic
from glm_mlx.model.config import ModelArgs
from glm_mlx.model.glm_moe_dsa import DecoderLayer, MTPLayer
from glm_mlx.model.sanitize import sanitize_weights


@dataclass
class Importance:
    imp: dict[str, mx.array] = field(default_factory=dict)  # module path -> mean x^2 per input channel
    tokens: int = 0  # calibration tokens
    counts: dict[str, list[int]] = field(default_factory=dict)  # routed experts: tokens per expert
    defaults: dict[str, str] = field(default_factory=dict)  # module -> what fell back to a default, and why
    wimp: dict[str, float] = field(default_factory=dict)  # sum_j imp_j * |W[:, j]|^2 (routed: usage-weighted)
    resid: dict[str, float] = field(default_factory=dict)  # layer -> mean |h|^2 of the residual entering it

    def get(self, module: str) -> mx.array | None:
        return self.imp.get(module)

    def save(self, path: str | Path) -> None:
        meta = {"tokens": self.tokens, "counts": self.counts, "defaults": self.defaults, "wimp": self.wimp,
                "resid": self.resid}
        # Streamed into a temp file (it can be a GB for GLM-5.1), then glm_mlx.atomic's rename and folder fsync.
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                mx.save_safetensors(f, dict(self.imp), metadata={"glm-mlx-imatrix": json.dumps(meta)})
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            atomic.replace(tmp, path, synced=True)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "Importance":
        arrays, metadata = mx.load(str(path), return_metadata=True)
        meta = json.loads(metadata["glm-mlx-imatrix"])
        return cls(dict(arrays), meta["tokens"], meta["counts"], meta["defaults"], meta["wimp"], meta["resid"])


class _Sums:
    def __init__(self):
        self.sum: dict[str, mx.array] = {}
        self.n: dict[str, mx.array | int] = {}

    def add(self, key, s, n):
        self.sum[key] = self.sum[key] + s if key in self.sum else s
        self.n[key] = self.n[key] + n if key in self.n else n


class _Rec(nn.Module):
    """Wraps a Linear / SwitchLinear / MultiLinear: records its input statistics, then calls it."""

    def __init__(self, inner, key: str, sums: _Sums, q_nope: tuple[int, int] | None = None):
        super().__init__()
        self.inner, self.key, self.sums, self.q_nope = inner, key, sums, q_nope

    def __call__(self, x, *args, **kwargs):
        inner, x2 = self.inner, x.astype(mx.float32) ** 2
        if isinstance(inner, SwitchLinear):
            idx = args[0] if args else kwargs["indices"]
            D = x.shape[-1]
            flat = mx.broadcast_to(x2.sum(-2), idx.shape + (D,)).reshape(-1, D)
            E = inner.weight.shape[0]
            ids = idx.reshape(-1)
            self.sums.add(self.key, mx.zeros((E, D)).at[ids].add(flat), mx.zeros((E,)).at[ids].add(x.shape[-2]))
        elif isinstance(inner, MultiLinear):
            # Only with transpose is x the quantized axis' input; embed_q's comes from q_b_proj.
            if kwargs.get("transpose", args[0] if args else True) and not self.key.endswith("embed_q"):
                H = inner.weight.shape[0]
                s = mx.broadcast_to(x2.sum(axis=(0, 2)), (H, x.shape[-1]))  # [B, H|1, L, in] -> [H, in]
                self.sums.add(self.key, s, x.shape[0] * x.shape[2])
        else:
            self.sums.add(self.key, x2.reshape(-1, x.shape[-1]).sum(0), x.size // x.shape[-1])
        y = inner(x, *args, **kwargs)
        if self.q_nope is not None:  # q_b_proj: its output's nope part is embed_q's input
            H, head = self.q_nope
            y2 = (y.astype(mx.float32) ** 2).reshape(-1, H, y.shape[-1] // H)[..., :head]
            self.sums.add(self.key.rsplit(".", 1)[0] + ".embed_q", y2.sum(0), y2.shape[0])
        return y


def _targets(module: nn.Module):
    return [(name, m) for name, m in module.named_modules()
            if name and isinstance(m, (nn.Linear, SwitchLinear, MultiLinear))]


@contextlib.contextmanager
def recording(module: nn.Module, prefix: str, sums: _Sums, args: ModelArgs):
    """Wrap every linear module of `module` with a recorder for the duration; restore them after."""
    wrapped = []
    for name, m in _targets(module):
        parent_path, _, attr = name.rpartition(".")
        parent = module
        for part in filter(None, parent_path.split(".")):
            parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
        key = f"{prefix}{name}"
        q = (args.num_attention_heads, args.qk_nope_head_dim) if name.endswith("self_attn.q_b_proj") else None
        setattr(parent, attr, _Rec(m, key, sums, q))
        wrapped.append((parent, attr, m))
    try:
        yield
    finally:
        for parent, attr, m in wrapped:
            setattr(parent, attr, m)


def _weight_energy(module: nn.Module, imp: mx.array, counts=None) -> float:
    """sum_j imp_j |W[:, j]|^2: the expected squared output (diagonal approximation). Routed experts
    are weighted by the share of tokens routed to each."""
    w = module.weight.astype(mx.float32)
    col = (w * w).sum(-2)  # [in] / [E, in] / [H, in]
    e = (col * imp).sum(-1)
    if counts is not None:
        c = mx.array(counts, dtype=mx.float32)
        e = (e * c).sum() / mx.maximum(c.sum(), 1) * (c.sum() > 0)
    return float(e.sum())


def _finish(result: Importance, sums: _Sums, module: nn.Module, prefix: str, args: ModelArgs):
    """Turn one layer's sums into importances (with the documented defaults) and weight energies."""
    mods = dict(_targets(module))
    keys = sorted(k for k in sums.sum if k.startswith(prefix))
    for key in keys:
        s, n = sums.sum.pop(key), sums.n.pop(key)
        local = key[len(prefix):]
        m = mods[local]
        if isinstance(m, SwitchLinear):
            n = mx.array(n)
            seen = n > 0
            imp = s / mx.maximum(n, 1)[:, None]
            never = [e for e, c in enumerate(n.tolist()) if c == 0]
            if never:
                if bool(seen.any()):
                    fallback, why = s.sum(0) / n.sum(), "pooled importance of the routed experts of this layer"
                else:
                    shared = result.imp.get(key.replace("switch_mlp", "shared_experts"))
                    ok = shared is not None and not key.endswith("down_proj")
                    fallback = shared if ok else mx.ones((s.shape[-1],))
                    why = "shared expert's input importance (same input)" if ok else "uniform (no expert routed)"
                imp = mx.where(seen[:, None], imp, fallback[None])
                result.defaults[key] = f"experts {never} never routed: {why}"
            result.counts[key] = [int(c) for c in n.tolist()]
        else:
            imp = s / max(int(n), 1)
        result.imp[key] = imp
        target = mods[local]
        result.wimp[key] = _weight_energy(target, imp, result.counts.get(key))
        mx.eval(result.imp[key])


def _layer_weights(source, args: ModelArgs, layer: int, dtype) -> list[tuple[str, mx.array]]:
    """One decoder layer's (or the MTP layer's) weights from the HF checkpoint, sanitized."""
    prefix = f"model.layers.{layer}."
    names = [k for k in source.weight_map if k.startswith(prefix) and not k.endswith("_scale_inv")]
    w = sanitize_weights(args, {k: source.read(k) for k in names}, keep_mtp=layer >= args.num_hidden_layers)
    return [(k[len(prefix):], v.astype(dtype) if "e_score_correction_bias" not in k else v) for k, v in w.items()]


def calibrate(source, token_chunks: list[list[int]], *, mtp: bool = True, dtype=mx.float32, progress=None) -> Importance:
    """Importance of every quantizable module of the checkpoint `source` (a quantize.source.Source)
    over the token chunks (each run as its own sequence), one layer in memory at a time."""
    args = ModelArgs.from_dict(source.config)
    mtp = mtp and bool(args.num_nextn_predict_layers) and f"model.layers.{args.num_hidden_layers}.eh_proj.weight" in source
    result, sums = Importance(tokens=sum(len(c) for c in token_chunks)), _Sums()
    embed = source.read("model.embed_tokens.weight").astype(dtype)
    h = [embed[mx.array(c)][None] for c in token_chunks]
    nxt = [embed[mx.array(c[1:])][None] for c in token_chunks] if mtp else None
    result.imp["model.embed_tokens"] = mx.ones((args.hidden_size,))
    result.defaults["model.embed_tokens"] = "uniform: embedding rows are looked up, not multiplied"
    del embed
    topk = [None] * len(h)
    for layer in range(args.num_hidden_layers):
        block = DecoderLayer(args, layer)
        block.load_weights(_layer_weights(source, args, layer, dtype))
        prefix = f"model.layers.{layer}."
        result.resid[str(layer)] = _energy(h)
        with recording(block, prefix, sums, args):
            for i in range(len(h)):
                h[i], topk[i] = block(h[i], None, topk[i])
                mx.eval(h[i], topk[i], sums.sum, sums.n)
        _finish(result, sums, block, prefix, args)
        del block
        if progress:
            progress(layer + 1)
    norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
    norm.load_weights([("weight", source.read("model.norm.weight").astype(dtype))])
    h = [norm(x) for x in h]

    def mtp_block():
        block = MTPLayer(args)
        block.load_weights(_layer_weights(source, args, args.num_hidden_layers, dtype))
        return block

    return head_and_mtp(result, sums, h, nxt, args, source.read("lm_head.weight").astype(dtype),
                        mtp_block if mtp else None)


def head_and_mtp(result, sums, h, nxt, args, head_weight, mtp_block) -> Importance:
    """The end of a calibration, every GLM's: the head over the final hidden states `h`, then (when
    `mtp_block()` is given; built only after the head is freed) the MTP layer over the next tokens'
    embeddings `nxt` and `h` shifted by one."""
    result.resid["head"] = _energy(h)
    head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
    head.load_weights([("weight", head_weight)])
    _run_head(result, sums, head, h, args)
    del head, head_weight
    if mtp_block is not None:
        n = args.num_hidden_layers
        block = mtp_block()
        prefix = f"model.layers.{n}."
        result.resid[str(n)] = _energy(h)
        with recording(block, prefix, sums, args):
            for i in range(len(h)):
                if nxt[i].shape[1]:
                    mx.eval(block(nxt[i], h[i][:, :-1]), sums.sum, sums.n)
        _finish(result, sums, block, prefix, args)
    return result


def _run_head(result, sums, head, h, args):
    holder = nn.Module()
    holder.lm_head = head
    with recording(holder, "", sums, args):
        for x in h:
            mx.eval(holder.lm_head(x)[..., :1], sums.sum, sums.n)
    _finish(result, sums, holder, "", args)


def _energy(h: list[mx.array]) -> float:
    """Mean squared norm of a hidden state per token."""
    tot = sum(float((x.astype(mx.float32) ** 2).sum()) for x in h)
    return tot / max(sum(x.shape[1] for x in h), 1)


def collect(model, token_chunks: list[list[int]]) -> Importance:
    """The same statistics from a glm_mlx Model in memory (its modules are restored afterwards).
    Used to check `calibrate` and for models small enough to hold."""
    args = model.args
    sums, result = _Sums(), Importance(tokens=sum(len(c) for c in token_chunks))
    result.imp["model.embed_tokens"] = mx.ones((args.hidden_size,))
    result.defaults["model.embed_tokens"] = "uniform: embedding rows are looked up, not multiplied"
    with recording(model, "", sums, args):
        for c in token_chunks:
            logits, hidden = model(mx.array([c]), return_hidden=True)
            mx.eval(logits, sums.sum, sums.n)
            if model.has_mtp and len(c) > 1:  # the MTP layer alone: its drafts' lm_head use is not recorded
                nxt = model.model.embed_tokens(mx.array([c[1:]]))
                mx.eval(model.mtp_layer(nxt, hidden[:, :-1]), sums.sum, sums.n)
    prefixes = [f"model.layers.{i}." for i in range(len(model.model.layers))]
    for layer, p in zip(model.model.layers, prefixes):
        _finish(result, sums, layer, p, args)
    holder = nn.Module()
    holder.lm_head = model.lm_head
    _finish(result, sums, holder, "", args)
    return result
