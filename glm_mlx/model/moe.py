"""Feed-forward blocks: the dense SwiGLU MLP and the routed MoE with a shared expert."""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from .config import ModelArgs


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


@mx.compile
def route(logits, correction_bias, top_k: int, n_group: int, topk_group: int, scaling: float, normalize: bool):
    """noaux_tc routing as one pure compiled function.

    logits [..., E] float32 -> (expert ids [..., k], weights [..., k]). Sigmoid scores; the
    correction bias only decides the choice; group-limited top-k (groups ranked by the sum of
    their two best biased scores); weights are the unbiased scores, normalised, then scaled.
    """
    scores = mx.sigmoid(logits)
    choice = scores + correction_bias
    if n_group > 1:
        grouped = mx.unflatten(choice, axis=-1, shape=(n_group, -1))  # [..., G, E/G]
        group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1)  # [..., G]
        drop = mx.argpartition(group_scores, kth=n_group - topk_group - 1, axis=-1)[..., : n_group - topk_group]
        # -inf, not 0: biased scores can be negative, and a zeroed group could still win.
        grouped = mx.put_along_axis(grouped, drop[..., None], mx.array(-mx.inf, grouped.dtype), axis=-2)
        choice = mx.flatten(grouped, -2, -1)
    inds = mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, weights * scaling


class MoEGate(nn.Module):
    """The router: `weight` [E, hidden] and the float32 `e_score_correction_bias` [E]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)

    def __call__(self, x):
        a = self.args
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T  # router runs in float32
        return route(logits, self.e_score_correction_bias.astype(mx.float32), a.num_experts_per_tok,
                     a.n_group, a.topk_group, float(a.routed_scaling_factor), bool(a.norm_topk_prob))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = MoEGate(args)
        # Stacked expert weights [E, out, in] run through gather_mm / gather_qmm.
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts)
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def __call__(self, x):
        inds, weights = self.gate(x)
        y = self.switch_mlp(x, inds)  # [..., k, hidden]
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y
