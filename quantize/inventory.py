"""Every tensor of a GLM-5.x config as the MLX model holds it (mlx-lm naming).

Differences from the Hugging Face checkpoint (see the reference README's table):
  - routed experts are stacked: mlp.switch_mlp.{gate,up,down}_proj.weight [E, out, in];
  - kv_b_proj is split per head into embed_q [H, kv_lora, nope] and unembed_out
    [H, v_head, kv_lora] (same parameter count), both quantizable (groups along the last dim).
Quantizable entries carry the module path that mlx-lm's `config["quantization"]` keys on.
"""

from __future__ import annotations

from glm_mlx.model.config import ModelArgs

from .pricing import (ATTN, COMPONENTS, DENSE, DTYPE_BYTES, EMBED, HC, INDEXER, MTP, NORMS, ROUTED,  # noqa: F401
                      ROUTER, SHARED, Tensor, mla_tensors, mlp_tensors, model_dtype_bytes)


def has_mtp(args: ModelArgs) -> bool:
    return bool(args.num_nextn_predict_layers)


def layer_is_moe(args: ModelArgs, layer: int) -> bool:
    if layer >= args.num_hidden_layers:  # the MTP layer carries a MoE block when the model has experts
        return bool(args.n_routed_experts)
    return args.mlp_layer_types[layer] == "sparse"


def inventory(args: ModelArgs, mtp: bool = True) -> list[Tensor]:
    """All tensors; the MTP layer (index num_hidden_layers) only when `mtp` and the config has one.
    A GLM-5.3-Flash config (glm5_next) has its own inventory (next_inventory.py)."""
    if getattr(args, "model_type", "") == "glm5_next":
        from .next_inventory import next_inventory

        return next_inventory(args, mtp)
    db = model_dtype_bytes(args)
    out: list[Tensor] = []

    def add(name, shape, component, layer=None, quantizable=False, dtype_bytes=db):
        is_mtp = layer is not None and layer >= args.num_hidden_layers
        out.append(Tensor(name, tuple(int(s) for s in shape), component, layer, is_mtp, quantizable, dtype_bytes))

    h, H = args.hidden_size, args.num_attention_heads
    add("model.embed_tokens.weight", (args.vocab_size, h), EMBED, quantizable=True)
    n_layers = args.num_hidden_layers + (1 if mtp and has_mtp(args) else 0)
    for l in range(n_layers):
        p = f"model.layers.{l}"
        if l >= args.num_hidden_layers:  # NextN extras ahead of the decoder block
            add(f"{p}.enorm.weight", (h,), NORMS, l)
            add(f"{p}.hnorm.weight", (h,), NORMS, l)
            add(f"{p}.eh_proj.weight", (h, 2 * h), MTP, l, quantizable=True)
            add(f"{p}.shared_head.norm.weight", (h,), NORMS, l)
        add(f"{p}.input_layernorm.weight", (h,), NORMS, l)
        add(f"{p}.post_attention_layernorm.weight", (h,), NORMS, l)
        mla_tensors(add, args, p + ".self_attn", l)
        mlp_tensors(add, args, p + ".mlp", l, moe=layer_is_moe(args, l), router_bytes=None)
    add("model.norm.weight", (h,), NORMS)
    add("lm_head.weight", (args.vocab_size, h), EMBED, quantizable=True)
    return out


def param_count(tensors) -> int:
    return sum(t.numel for t in tensors)


def params_by_group(tensors) -> dict[str, int]:
    out = {c: 0 for c in COMPONENTS}
    for t in tensors:
        out[t.group] += t.numel
    return {k: v for k, v in out.items() if v}
