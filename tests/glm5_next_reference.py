"""Tiny GLM-5.3-Flash (glm5_next) checkpoints written by the reference implementation
(transformers.Glm5NextForConditionalGeneration, with a one-block vision tower), and reference
computations to compare against.

Parity fixtures must be tie-free: `pool_gaps` recomputes the reference indexer's pool scores so a test
can assert a gap between the K-th and (K+1)-th visible pool of every query that selects.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Glm5NextConfig, Glm5NextForConditionalGeneration

TEXT = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=0, qk_nope_head_dim=16, v_head_dim=16,
    index_topk=8, index_head_dim=32, index_n_heads=8, index_kpool=2, linear_head_dim=16, linear_num_heads=4,
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"], hc_mult=3, hc_sinkhorn_iters=20, swiglu_limit=1.5,
    pad_token_id=0, eos_token_id=[1, 2], max_position_embeddings=512,
)
VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64,
              projection_intermediate_size=32)


def tiny_config(**overrides) -> Glm5NextConfig:
    return Glm5NextConfig(text_config={**TEXT, **overrides}, vision_config=VISION)


def _spread_weights(model, seed: int):
    """Larger-than-init weights so logits, routing and indexer scores are well separated, and gates
    that decay (A_log, dt_bias) without saturating."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith(("A_log", "dt_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5)
            elif "k_norm.bias" in name:  # positive key bias: most ReLU'd indexer scores are non-zero
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def make_reference(path, seed: int = 0, **overrides):
    """Write a tiny HF-format checkpoint with the reference's own save_pretrained; return the model."""
    torch.manual_seed(seed)
    model = Glm5NextForConditionalGeneration(tiny_config(**overrides)).eval()
    _spread_weights(model, seed)
    model.save_pretrained(path)
    return model


@torch.no_grad()
def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):  # no cache: every step is a full forward (the model is tiny)
        toks.append(int(model(input_ids=torch.tensor([toks])).logits[0, -1].argmax()))
    return toks[len(prompt):]


@torch.no_grad()
def pool_scores(idx, hidden, q_resid) -> torch.Tensor:
    """The reference indexer's pooled scores [S, P] for one sequence (its own modules)."""
    B, S, _ = hidden.shape
    q = idx.wq_b(q_resid).view(B, S, idx.n_heads, idx.head_dim)
    k = idx.k_norm(idx.wk(hidden))
    gate = torch.nn.functional.linear(hidden, idx.index_kpool_compress_gate)
    packed = torch.cat([k, gate, torch.ones(B, S, 1)], dim=-1)
    pool_keys, _, _ = idx.get_pooled_states(packed_states=packed)
    scores = torch.relu(q.float() @ pool_keys.transpose(-1, -2).float().unsqueeze(1) * idx.softmax_scale)
    w = idx.weights_proj(hidden).float() * idx.n_heads**-0.5
    return (w.unsqueeze(-2) @ scores).squeeze(-2)[0]


@torch.no_grad()
def pool_gaps(model, tokens: np.ndarray, indexers=None) -> list[float]:
    """For every indexer call and query that sees more than K = index_topk / index_kpool complete pools:
    the gap between its K-th and (K+1)-th visible pool score, relative to the score scale."""
    calls = []
    mods = indexers if indexers is not None else [
        layer.self_attn.indexer for layer in model.model.language_model.layers
        if getattr(layer.self_attn, "indexer", None) is not None]
    handles = [m.register_forward_hook(lambda mod, a, kw, out: calls.append((mod, kw)), with_kwargs=True)
               for m in mods]
    try:
        model(input_ids=torch.tensor(tokens))
    finally:
        for h in handles:
            h.remove()
    return gaps_of(calls)


def gaps_of(calls) -> list[float]:
    gaps = []
    for idx, kw in calls:
        index = pool_scores(idx, kw["hidden_states"], kw["q_resid"])
        p, K = idx.index_kpool, idx.index_topk // idx.index_kpool
        scale = index.abs().max().item()
        for i in range(index.shape[0]):
            seen = (i + 1) // p
            if seen > K:
                row = torch.sort(index[i, :seen], descending=True).values
                gaps.append((row[K - 1] - row[K]).item() / scale)
    return gaps
