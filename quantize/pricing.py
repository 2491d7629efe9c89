"""The planner's shared units: the report's components, a tensor as the planner prices it, bytes per
element of the model dtype, the working set's constants, and the MLA + indexer and MLP tensors both GLMs have. One module that every model's
inventory and cost estimate imports (inventory.py and working_set.py for GLM-5.1, next_inventory.py
and next_costs.py for GLM-5.3-Flash), so the dispatch by model_type runs one way."""

from __future__ import annotations

import math
from dataclasses import dataclass

from glm_mlx.model.cache import GROWTH_STEP

EMBED, ATTN, INDEXER, DENSE, ROUTED, SHARED, ROUTER, NORMS, MTP, HC = (
    "embeddings/head", "attention", "indexer", "dense MLP", "routed experts",
    "shared experts", "router", "norms", "MTP", "hyper-connections")
COMPONENTS = (EMBED, ATTN, INDEXER, DENSE, ROUTED, SHARED, ROUTER, NORMS, MTP, HC)  # HC: GLM-5.3-Flash only

# Model dtype names in config.json -> bytes per element of unquantized tensors.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    component: str  # what it is (the MTP layer's experts are ROUTED here)
    layer: int | None = None  # decoder layer, None for embeddings / final norm / head
    mtp: bool = False  # part of the multi-token-prediction layer
    quantizable: bool = False  # a Linear / Embedding / MultiLinear / SwitchLinear weight
    dtype_bytes: int = 2  # when stored unquantized

    @property
    def module(self) -> str:
        """Module path (the name without .weight/.bias): mlx-lm's quantization key."""
        return self.name.rsplit(".", 1)[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def group(self) -> str:
        """Report bucket: the MTP layer is its own line."""
        return MTP if self.mtp else self.component


def model_dtype_bytes(args) -> int:
    dtype = args.extra.get("dtype") or args.extra.get("torch_dtype") or "bfloat16"
    return DTYPE_BYTES.get(str(dtype), 2)


SCORE_BYTES = 4  # attention and indexer scores are float32
# Query chunks (indexer, sparse attention) whose tensors are alive at once: MLX queues ~50 ops
# ahead of execution, allocating their outputs, which covers about this many chunks (measured
# on the CPU backend).
IN_FLIGHT = 4


def cache_tokens(context: int) -> int:
    """Tokens the KV cache buffers hold at `context`: they grow in GROWTH_STEP-token steps."""
    return -(-context // GROWTH_STEP) * GROWTH_STEP


def mla_tensors(add, args, p: str, l: int):
    """The MLA attention and DSA indexer tensors both GLMs share (GLM-5.3-Flash: with a zero-width RoPE
    half, and its pooled-key extras added by next_inventory)."""
    h, H, q, kv, rope = args.hidden_size, args.num_attention_heads, args.q_lora_rank, args.kv_lora_rank, args.qk_rope_head_dim
    bias = args.attention_bias
    add(f"{p}.q_a_proj.weight", (q, h), ATTN, l, True)
    if bias:
        add(f"{p}.q_a_proj.bias", (q,), ATTN, l)
    add(f"{p}.q_a_layernorm.weight", (q,), NORMS, l)
    add(f"{p}.q_b_proj.weight", (H * args.qk_head_dim, q), ATTN, l, True)
    add(f"{p}.kv_a_proj_with_mqa.weight", (kv + rope, h), ATTN, l, True)
    if bias:
        add(f"{p}.kv_a_proj_with_mqa.bias", (kv + rope,), ATTN, l)
    add(f"{p}.kv_a_layernorm.weight", (kv,), NORMS, l)
    add(f"{p}.embed_q.weight", (H, kv, args.qk_nope_head_dim), ATTN, l, True)
    add(f"{p}.unembed_out.weight", (H, args.v_head_dim, kv), ATTN, l, True)
    add(f"{p}.o_proj.weight", (h, H * args.v_head_dim), ATTN, l, True)
    if bias:
        add(f"{p}.o_proj.bias", (h,), ATTN, l)
    if args.has_indexer(l):
        i, d = f"{p}.indexer", args.index_head_dim
        add(f"{i}.wq_b.weight", (args.index_n_heads * d, q), INDEXER, l, True)
        add(f"{i}.wk.weight", (d, h), INDEXER, l, True)
        add(f"{i}.k_norm.weight", (d,), INDEXER, l)  # LayerNorm: never quantized
        add(f"{i}.k_norm.bias", (d,), INDEXER, l)
        add(f"{i}.weights_proj.weight", (args.index_n_heads, h), INDEXER, l, True)


def mlp_tensors(add, args, p: str, l: int, *, moe: bool, router_bytes: int | None):
    """A layer's MLP as both GLMs hold it: dense gate/up/down, or the router (its weight stored in
    `router_bytes` per element, None: the model dtype; the correction bias always float32), the stacked
    routed experts and the shared experts."""
    h = args.hidden_size
    if not moe:
        i = args.intermediate_size
        add(f"{p}.gate_proj.weight", (i, h), DENSE, l, True)
        add(f"{p}.up_proj.weight", (i, h), DENSE, l, True)
        add(f"{p}.down_proj.weight", (h, i), DENSE, l, True)
        return
    E, m = args.n_routed_experts, args.moe_intermediate_size
    if router_bytes is None:
        add(f"{p}.gate.weight", (E, h), ROUTER, l)
    else:
        add(f"{p}.gate.weight", (E, h), ROUTER, l, dtype_bytes=router_bytes)
    add(f"{p}.gate.e_score_correction_bias", (E,), ROUTER, l, dtype_bytes=4)  # always float32
    add(f"{p}.switch_mlp.gate_proj.weight", (E, m, h), ROUTED, l, True)
    add(f"{p}.switch_mlp.up_proj.weight", (E, m, h), ROUTED, l, True)
    add(f"{p}.switch_mlp.down_proj.weight", (E, h, m), ROUTED, l, True)
    if args.n_shared_experts:
        s = m * args.n_shared_experts
        add(f"{p}.shared_experts.gate_proj.weight", (s, h), SHARED, l, True)
        add(f"{p}.shared_experts.up_proj.weight", (s, h), SHARED, l, True)
        add(f"{p}.shared_experts.down_proj.weight", (h, s), SHARED, l, True)
