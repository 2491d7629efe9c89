"""Tiny GLM-MoE-DSA checkpoints written by the reference implementation (transformers), and
reference computations to compare against.

Parity fixtures must be tie-free: with random weights the ReLU'd indexer scores are often
exactly 0, and two correct implementations may then pick different top-k sets. `index_scores`
recomputes the reference indexer's scores so tests can assert a gap at the k-th score.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    index_topk=8, index_head_dim=32, index_n_heads=8, first_k_dense_replace=1, max_position_embeddings=512,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, eos_token_id=[1, 2], routed_scaling_factor=2.5,
)


def tiny_config(**overrides) -> GlmMoeDsaConfig:
    cfg = {**TINY, **overrides}
    extra = {k: cfg.pop(k) for k in ("index_topk_freq", "index_skip_topk_offset", "index_topk_pattern") if k in cfg}
    return GlmMoeDsaConfig(**cfg, **extra)


def _spread_weights(model: GlmMoeDsaForCausalLM, seed: int):
    """Larger-than-init weights so logits, routing and indexer scores are well separated."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5)
            elif "k_norm.bias" in name:
                # Positive key bias: most ReLU'd indexer scores are non-zero, hence distinct.
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def make_reference(path: Path, seed: int = 0, **overrides) -> GlmMoeDsaForCausalLM:
    """Write a tiny HF-format checkpoint with the reference's own save_pretrained; return the model."""
    torch.manual_seed(seed)
    model = GlmMoeDsaForCausalLM(tiny_config(**overrides)).eval()
    _spread_weights(model, seed)
    model.save_pretrained(path)
    return model


@torch.no_grad()
def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    return model(torch.tensor(tokens)).logits.float().numpy()


@torch.no_grad()
def index_gaps(model, tokens: np.ndarray) -> list[float]:
    """For every full-indexer layer and query with more causal keys than index_topk: the gap between
    the k-th and (k+1)-th indexer score (relative to the score scale). Positive gaps = tie-free."""
    gaps = []
    captured = {}

    def hook(module, args, kwargs, output):
        captured.setdefault("calls", []).append((module, args, kwargs))

    handles = [layer.self_attn.indexer.register_forward_hook(hook, with_kwargs=True)
               for layer in model.model.layers if layer.self_attn.indexer is not None]
    model(torch.tensor(tokens))
    for h in handles:
        h.remove()
    for idx, args, kwargs in captured["calls"]:
        hidden, q_resid, pos_emb = args[0], args[1], args[2]
        B, S, _ = hidden.shape
        q = idx.wq_b(q_resid).view(B, S, idx.n_heads, idx.head_dim)
        k = idx.k_norm(idx.wk(hidden)).unsqueeze(2)
        from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave as rope

        r = idx.qk_rope_head_dim
        q_rot, k_rot = rope(q[..., :r], k[..., :r], *pos_emb, unsqueeze_dim=2)
        q = torch.cat([q_rot, q[..., r:]], -1)
        k = torch.cat([k_rot, k[..., r:]], -1).squeeze(2)
        scores = torch.relu(q.float() @ k.float().transpose(-1, -2).unsqueeze(1) * idx.softmax_scale)
        w = idx.weights_proj(hidden).float() * idx.n_heads**-0.5
        index = (w.unsqueeze(-2) @ scores).squeeze(-2)[0]  # [S, S]
        scale = index.abs().max().item()
        for i in range(idx.index_topk, S):
            row = torch.sort(index[i, : i + 1], descending=True).values
            gaps.append((row[idx.index_topk - 1] - row[idx.index_topk]).item() / scale)
    return gaps


def add_mtp_layer(path: Path, model: GlmMoeDsaForCausalLM, seed: int = 1) -> dict[str, torch.Tensor]:
    """Append a DeepSeek-V3-style MTP layer (model.layers.N.*) as its own shard, updating the index.

    The layer is a reference decoder layer built for index N plus enorm/hnorm/eh_proj/shared_head.
    Returns the MTP tensors (HF naming, per-expert) for a direct reference computation.
    """
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaDecoderLayer

    cfg = model.config
    n = cfg.num_hidden_layers
    big = GlmMoeDsaConfig(**{**cfg.to_dict(), "num_hidden_layers": n + 1, "indexer_types": None,
                             "mlp_layer_types": None, "layer_types": None})
    big._attn_implementation = "eager"  # standalone layers default to None, which skips the DSA mask
    torch.manual_seed(seed)
    layer = GlmMoeDsaDecoderLayer(big, n)
    holder = torch.nn.Module()
    holder.layer = layer
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = (1.0 / p.shape[-1]) ** 0.5 if p.ndim >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and "bias" not in name else 0.0))
            if "k_norm.bias" in name:  # positive key bias keeps the indexer scores tie-free
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    d = cfg.hidden_size
    for name, t in layer.state_dict().items():
        if ".experts.gate_up_proj" in name:
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                tensors[f"mlp.experts.{e}.gate_proj.weight"] = gate.clone()
                tensors[f"mlp.experts.{e}.up_proj.weight"] = up.clone()
        elif ".experts.down_proj" in name:
            for e in range(t.shape[0]):
                tensors[f"mlp.experts.{e}.down_proj.weight"] = t[e].clone()
        else:
            tensors[name] = t.clone()
    tensors["enorm.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    tensors["hnorm.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    tensors["shared_head.norm.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    tensors["eh_proj.weight"] = torch.randn(d, 2 * d, generator=g) * (0.5 / d) ** 0.5
    full = {f"model.layers.{n}.{k}": v.contiguous() for k, v in tensors.items()}
    save_file(full, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
    _add_to_index(path, full, "model-mtp.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}, indent=2))
    return {"layer": layer, "config": big, **tensors}


def _add_to_index(path: Path, tensors: dict, shard: str):
    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
    index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index, indent=2))


GLM_SPECIALS = ["<pad>", "<|endoftext|>", "<|user|>", "[gMASK]", "<sop>", "<|system|>", "<|assistant|>",
                "<think>", "</think>", "<|observation|>", "<unk>"]
# GLM's chat format: [gMASK]<sop>, role tags, an optional thinking block.
GLM_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% if not enable_thinking|default(true) %}<think></think>{% endif %}{% endif %}"
)


def write_tokenizer(path: Path):
    """A character-level tokenizer (ids < TINY vocab) with GLM-style special tokens and chat template."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(" \n" + string.ascii_letters + string.digits + ".,!?'-:")
    vocab = {t: i for i, t in enumerate(GLM_SPECIALS + chars)}
    assert len(vocab) <= TINY["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(GLM_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = GLM_CHAT_TEMPLATE
    fast.save_pretrained(path)
