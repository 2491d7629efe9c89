"""Glm5NextArgs: a GLM-5.3-Flash (`glm5_next`) config.json with Glm5NextTextConfig's key names.

The checkpoint's config is either nested (`Glm5NextConfig`: `text_config` + `vision_config`, top-level
`model_type: glm5_next`) or flat (text keys at the top, as the reference's `__post_init__` accepts);
`from_dict` takes both. Defaults and derived schedules (`layer_types`, `mlp_layer_types`,
`indexer_types`, `linear_attn_config`) follow `transformers.Glm5NextTextConfig.__post_init__`.
Unknown keys go to `extra`; values the model cannot honour raise `ConfigError` naming the key.
This is the one reader of a glm5_next config.json: the planner and the converter (glm_mlx/quantize)
price and name tensors from these fields and the per-layer cache sizes below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .config import ConfigArgs, check_kv_cache_bits, check_moe_groups, indexer_schedule, raise_bad

MODEL_TYPES = ("glm5_next", "glm5_next_text")
LINEAR, INDEXED = "linear_attention", "indexed_attention"
STATE_BYTES = 4  # the KDA recurrent state is float32 (the reference casts it so)


def is_glm5_next(config: dict) -> bool:
    """Whether a config.json is GLM-5.3-Flash's (its top-level model_type, as AutoConfig dispatches)."""
    return config.get("model_type") in MODEL_TYPES


@dataclass
class Glm5NextArgs(ConfigArgs):
    model_type: str = "glm5_next"
    vocab_size: int = 154880
    hidden_size: int = 4096
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 45
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 288
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 0
    v_head_dim: int = 256
    qk_nope_head_dim: int = 256
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    mlp_layer_types: list | None = None
    attention_bias: bool = False
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    layer_types: list | None = None
    indexer_types: list | None = None
    index_topk_pattern: Any = None  # folded into indexer_types, as the reference does
    index_topk_freq: int = 1
    index_skip_topk_offset: int = 2
    swiglu_limit: float = 10.0
    linear_head_dim: int = 128
    linear_num_heads: int = 64
    linear_conv_kernel_dim: int = 4
    linear_lower_bound: float | None = -5.0
    linear_attn_config: dict | None = None  # older dict form of the linear_* keys
    hc_mult: int = 4
    hc_eps: float = 1e-6
    hc_sinkhorn_iters: int = 20
    index_kpool: int = 16
    index_kpool_always_select_tail: bool = True
    num_nextn_predict_layers: int = 1  # the MTP block (layer num_hidden_layers); not a reference key
    # Not an HF key: the DSA latent as `kv_cache_bits`-bit codes, GLM-5.1's layout (config.ModelArgs). The
    # planner prices it (`glm-mlx fit --kv-bits`); the MLX model's caches do not build it yet (Model refuses it).
    kv_cache_bits: int | None = None
    eos_token_id: Any = None
    bos_token_id: Any = None
    pad_token_id: Any = None
    quantization: dict | None = None  # mlx-lm convention: global settings + per-module overrides
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys; "vision_config" when present

    @classmethod
    def from_dict(cls, config: dict) -> "Glm5NextArgs":
        """A config.json dict (nested with text_config, or flat) -> Glm5NextArgs."""
        config = dict(config)
        if not is_glm5_next(config):
            raise ConfigError(f"model_type is {config.get('model_type')!r}, expected 'glm5_next' (GLM-5.3-Flash)")
        text = config.pop("text_config", None)
        if text:  # nested: text keys win; top-level quantization / eos stay
            config = {**config, **{k: v for k, v in text.items() if k != "model_type"}}
        return super().from_dict(config)

    @classmethod
    def from_config(cls, config: "dict | str | Path") -> "Glm5NextArgs":
        """A dict or a path (folder or config.json)."""
        return cls.from_dict(config) if isinstance(config, dict) else cls.from_file(config)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type is {self.model_type!r}, expected 'glm5_next' (GLM-5.3-Flash)")
        self._resolve()
        self._validate()

    def _resolve(self):
        n = self.num_hidden_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense"] * min(3, n) + ["sparse"] * (n - min(3, n))
        if self.layer_types is None:  # 3 KDA layers, then one DSA layer
            self.layer_types = [LINEAR if i % 4 != 3 else INDEXED for i in range(n)]
        self.layer_types = [INDEXED if t == "full_attention" else t for t in self.layer_types]
        if self.indexer_types is None:
            self.indexer_types = indexer_schedule(n, self.index_topk_pattern, self.index_topk_freq,
                                                  self.index_skip_topk_offset)
        if self.linear_attn_config:
            d = self.linear_attn_config
            self.linear_head_dim = d.get("head_dim", self.linear_head_dim)
            self.linear_num_heads = d.get("num_heads", self.linear_num_heads)
            self.linear_conv_kernel_dim = d.get("short_conv_kernel_size", self.linear_conv_kernel_dim)
            self.linear_lower_bound = d.get("gate_lower_bound", self.linear_lower_bound)
            if d.get("safe_gate", True) and self.linear_lower_bound is None:
                self.linear_lower_bound = -5.0

    def _validate(self):
        bad = raise_bad
        n = self.num_hidden_layers
        for key in ("layer_types", "mlp_layer_types", "indexer_types"):
            if len(getattr(self, key)) != n:
                bad(key, getattr(self, key), f"needs {n} entries (num_hidden_layers)")
        if set(self.layer_types) - {LINEAR, INDEXED}:
            bad("layer_types", self.layer_types, f"entries must be {LINEAR!r} or {INDEXED!r}")
        if set(self.mlp_layer_types) - {"dense", "sparse"}:
            bad("mlp_layer_types", self.mlp_layer_types, "entries must be 'dense' or 'sparse'")
        if set(self.indexer_types) - {"full", "shared"}:
            bad("indexer_types", self.indexer_types, "entries must be 'full' or 'shared'")
        for i in range(n):
            # The reference hands a shared DSA layer the top-k of the layer right before it only.
            if self.is_indexed(i) and self.indexer_types[i] == "shared" and not (
                    i > 0 and self.is_indexed(i - 1)):
                bad("indexer_types", self.indexer_types, f"layer {i} is 'shared' but layer {i - 1} is no DSA layer")
        if self.qk_rope_head_dim != 0:
            bad("qk_rope_head_dim", self.qk_rope_head_dim, "GLM-5.3-Flash's DSA layers use no RoPE (0)")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", self.num_key_value_heads, "MLA: must equal num_attention_heads")
        if not self.q_lora_rank:
            bad("q_lora_rank", self.q_lora_rank, "the DSA indexer reads the q latent; must be > 0")
        if self.index_kpool < 1 or self.index_topk % self.index_kpool:
            bad("index_kpool", self.index_kpool, f"must be >= 1 and divide index_topk={self.index_topk}")
        if not self.index_kpool_always_select_tail:
            # Without the tail, a query's own incomplete pool is invisible (the first tokens see nothing).
            bad("index_kpool_always_select_tail", False, "only True is supported")
        if self.hidden_act != "silu":
            bad("hidden_act", self.hidden_act, "only 'silu' is supported")
        if "sparse" in self.mlp_layer_types:  # the reference's router: the same noaux_tc as GLM-5.1's
            check_moe_groups(bad, self.n_routed_experts, self.n_group, self.topk_group, self.num_experts_per_tok)
        if self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            bad("hc_mult", self.hc_mult, "hc_mult and hc_sinkhorn_iters must be >= 1")
        if self.linear_conv_kernel_dim < 1:
            bad("linear_conv_kernel_dim", self.linear_conv_kernel_dim, "must be >= 1")
        if self.num_nextn_predict_layers not in (0, 1):
            bad("num_nextn_predict_layers", self.num_nextn_predict_layers, "one MTP block at most; 0 or 1 supported")
        check_kv_cache_bits(bad, self.kv_cache_bits, self.kv_lora_rank)
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", True, "GLM-5.3-Flash keeps a separate lm_head")

    # --- derived shapes --------------------------------------------------------------------
    def is_indexed(self, layer: int) -> bool:
        """Whether layer `layer` is a DSA (MLA) layer; the MTP layer (index num_hidden_layers) is one."""
        return layer >= self.num_hidden_layers or self.layer_types[layer] == INDEXED

    def has_indexer(self, layer: int) -> bool:
        """Whether layer `layer` is a DSA layer that runs its own indexer (the MTP layer always does)."""
        return self.is_indexed(layer) and (layer >= self.num_hidden_layers or self.indexer_types[layer] == "full")

    @property
    def linear_dim(self) -> int:
        """A KDA layer's q, k and v width (linear_num_heads x linear_head_dim)."""
        return self.linear_num_heads * self.linear_head_dim

    @property
    def has_vision(self) -> bool:
        return bool(self.extra.get("vision_config"))

    # --- analytic cache costs (checked against real nbytes by the tests) ------------------
    def indexer_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """A DSA layer's own indexer, per token: its key and pool gate (2 x index_head_dim) plus one pooled
        key per index_kpool tokens (counted here as index_head_dim / index_kpool per token)."""
        return 2 * self.index_head_dim * dtype_bytes + self.index_head_dim * dtype_bytes // self.index_kpool

    def layer_bytes_per_token(self, layer: int, dtype_bytes: int = 2) -> int:
        """Layer `layer`'s cache per token: a DSA layer's latent (kv_lora_rank; latent_bytes_per_token) and,
        with its own indexer, indexer_bytes_per_token; a KDA layer's none (its state is per sequence)."""
        if not self.is_indexed(layer):
            return 0
        return self.latent_bytes_per_token(dtype_bytes) + (self.indexer_bytes_per_token(dtype_bytes)
                                                            if self.has_indexer(layer) else 0)

    def cache_bytes_per_token(self, dtype_bytes: int = 2, mtp: bool = False) -> int:
        return sum(self.layer_bytes_per_token(i, dtype_bytes) for i in self.layers(mtp))

    def layer_state_bytes(self, layer: int, dtype_bytes: int = 2) -> int:
        """Layer `layer`'s fixed per-sequence bytes: a KDA layer's float32 recurrent state [H, Dv, Dk] and
        conv state (linear_conv_kernel_dim - 1 inputs of 3 * H * Dk channels, model dtype); 0 for DSA."""
        if self.is_indexed(layer):
            return 0
        H, D, K = self.linear_num_heads, self.linear_head_dim, self.linear_conv_kernel_dim
        return H * D * D * STATE_BYTES + (K - 1) * 3 * H * D * dtype_bytes

    def kda_state_bytes(self, dtype_bytes: int = 2) -> int:
        """Fixed per-sequence bytes of all KDA layers (layer_state_bytes summed)."""
        return sum(self.layer_state_bytes(i, dtype_bytes) for i in range(self.num_hidden_layers))


ModelArgs = Glm5NextArgs  # the name the planner looks for beside GLM-5.1's config.ModelArgs
