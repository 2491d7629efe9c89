"""Every tensor of GLM-5.3-Flash's language model (`glm5_next`), named and shaped as transformers'
`Glm5NextForConditionalGeneration` holds them (prefix `model.language_model.` written `model.`), with
the dtypes the reference keeps (`_keep_in_fp32_modules_strict`: the router, its bias, the KDA
convolution, dt_bias, A_log and the hyper-connections' base/scale are float32).

Differences, all how the checkpoint and the MLX model (glm_mlx/model/glm5_next.py) hold the same parameters:
  - the KDA forget gate's f_a_proj, f_b_proj, dt_bias and A_log sit on `self_attn` (the checkpoint's
    names; the reference renames them into `self_attn.forget_gate.`);
  - the KDA conv1d weight is listed in MLX's layout [3 x linear_dim, K, 1] (the reference's conv1d is
    [C, 1, K]; the checkpoint stores q/k/v_conv1d [linear_dim, 1, K] each: the same elements);
  - routed experts: the reference's `mlp.experts.gate_up_proj` [E, 2 x moe_inter, h] and
    `mlp.experts.down_proj` [E, h, moe_inter] are `mlp.switch_mlp.{gate,up,down}_proj.weight`
    (mlx-lm's SwitchGLU: gate and up split, quantized along the hidden dim alike);
  - `self_attn.kv_b_proj` [H x (nope + v), kv_lora] is split per head into `embed_q` [H, kv_lora, nope]
    and `unembed_out` [H, v, kv_lora] (the absorbed MLA; the same parameters and quantization groups).
Left out: the vision tower and its merger (`model.visual.*`, ~0.46B parameters): fit plans text.
The MTP block (checkpoint layer 45, which the reference skips on load) is priced as mlx-vlm's
glm5_next drafter builds it: enorm, hnorm, eh_proj [h, 2h], a DSA attention with its own indexer and
a MoE block, input/post-attention norms and shared_head.norm; no hyper-connections.
"""

from __future__ import annotations

from glm_mlx.model.glm5_next_config import Glm5NextArgs

from .pricing import ATTN, DENSE, EMBED, HC, INDEXER, MTP, NORMS, ROUTED, ROUTER, SHARED, Tensor, mla_tensors, mlp_tensors, model_dtype_bytes

F32 = 4


def next_inventory(args: Glm5NextArgs, mtp: bool = True) -> list[Tensor]:
    db = model_dtype_bytes(args)
    out: list[Tensor] = []

    def add(name, shape, component, layer=None, quantizable=False, dtype_bytes=db):
        is_mtp = layer is not None and layer >= args.num_hidden_layers
        out.append(Tensor(name, tuple(int(s) for s in shape), component, layer, is_mtp, quantizable, dtype_bytes))

    h = args.hidden_size
    add("model.embed_tokens.weight", (args.vocab_size, h), EMBED, quantizable=True)
    for l in args.layers(mtp):
        p = f"model.layers.{l}"
        if l >= args.num_hidden_layers:  # NextN extras ahead of the decoder block
            add(f"{p}.enorm.weight", (h,), NORMS, l)
            add(f"{p}.hnorm.weight", (h,), NORMS, l)
            add(f"{p}.eh_proj.weight", (h, 2 * h), MTP, l, quantizable=True)
            add(f"{p}.shared_head.norm.weight", (h,), NORMS, l)
        if args.is_indexed(l):
            _dsa(add, args, p + ".self_attn", l)
        else:
            _kda(add, args, p + ".self_attn", l)
        # the reference keeps the router float32; GLM-5.1 stores it in the model dtype
        moe = l >= args.num_hidden_layers or args.mlp_layer_types[l] == "sparse"
        mlp_tensors(add, args, p + ".mlp", l, moe=moe, router_bytes=F32)
        add(f"{p}.input_layernorm.weight", (h,), NORMS, l)
        add(f"{p}.post_attention_layernorm.weight", (h,), NORMS, l)
        if l < args.num_hidden_layers:  # hyper-connections: hc_mult residual streams mixed per sub-block
            n = args.hc_mult
            for site in ("attn_hc", "ffn_hc"):
                add(f"{p}.{site}.fn", ((2 + n) * n, n * h), HC, l)
                add(f"{p}.{site}.base", ((2 + n) * n,), HC, l, dtype_bytes=F32)
                add(f"{p}.{site}.scale", (3,), HC, l, dtype_bytes=F32)
    add("model.norm.weight", (h,), NORMS)
    add("lm_head.weight", (args.vocab_size, h), EMBED, quantizable=True)
    return out


def _kda(add, args: Glm5NextArgs, p: str, l: int):
    """Kimi Delta Attention (Glm5NextTextLinearAttention)."""
    h, Q, H, K = args.hidden_size, args.linear_dim, args.linear_num_heads, args.linear_head_dim
    for proj in ("q_proj", "k_proj", "v_proj"):
        add(f"{p}.{proj}.weight", (Q, h), ATTN, l, True)
    add(f"{p}.conv1d.weight", (3 * Q, args.linear_conv_kernel_dim, 1), ATTN, l, dtype_bytes=F32)  # depthwise, MLX layout
    add(f"{p}.f_a_proj.weight", (K, h), ATTN, l, True)
    add(f"{p}.f_b_proj.weight", (Q, K), ATTN, l, True)
    add(f"{p}.dt_bias", (Q,), ATTN, l, dtype_bytes=F32)
    add(f"{p}.A_log", (H,), ATTN, l, dtype_bytes=F32)
    add(f"{p}.b_proj.weight", (H, h), ATTN, l, True)
    add(f"{p}.g_a_proj.weight", (K, h), ATTN, l, True)
    add(f"{p}.g_b_proj.weight", (Q, K), ATTN, l, True)
    add(f"{p}.o_norm.weight", (K,), NORMS, l)
    add(f"{p}.o_proj.weight", (h, Q), ATTN, l, True)


def _dsa(add, args: Glm5NextArgs, p: str, l: int):
    """MLA without RoPE plus the pooled-key indexer (Glm5NextTextAttention, Glm5NextTextIndexer)."""
    mla_tensors(add, args, p, l)
    if args.has_indexer(l):
        i, d, h = f"{p}.indexer", args.index_head_dim, args.hidden_size
        add(f"{i}.index_kpool_compress_ape", (args.index_kpool, d), INDEXER, l)  # plain parameters, not Linear
        add(f"{i}.index_kpool_compress_gate", (d, h), INDEXER, l)
