"""NextArgs: a GLM-5.3-Flash (`model_type: glm5_next`) config, as the planner reads it.

The keys and defaults are transformers' `Glm5NextTextConfig` (models/glm5_next, 5.25); a checkpoint's
config.json may nest them under "text_config" (the vision tower's "vision_config" is ignored: the
planner prices the language model only). This is the planner's view, not the MLX model's config
(glm_mlx/model/glm5_next*.py); the cache layout below is the contract the planner prices:

  DSA layers ("indexed_attention", and the MTP layer): per token, the normed kv latent
  (kv_lora_rank + qk_rope_head_dim = 512 + 0 values), and in layers with their own indexer its key
  and pool gate (2 x index_head_dim) plus one pooled key per index_kpool tokens (128 / 16 = 8 values
  a token), in the model dtype - what glm_mlx/model/glm5_next_cache.py allocates (tests compare
  this with glm5_next_config.Glm5NextArgs.cache_bytes_per_token).
  KDA layers ("linear_attention"): nothing per token; per sequence, the short-convolution state
  ((linear_conv_kernel_dim - 1) x 3 x linear_num_heads x linear_head_dim, model dtype) and the
  delta-rule state (linear_num_heads x linear_head_dim x linear_head_dim, float32 as the
  reference keeps it).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm_mlx.errors import ConfigError
from glm_mlx.model.config import KV_CACHE_BITS

MODEL_TYPE = "glm5_next"
KDA, DSA = "linear_attention", "indexed_attention"
STATE_BYTES = 4  # the KDA recurrent state is float32 (the reference casts it so)


def is_next(args) -> bool:
    """Whether `args` is a GLM-5.3-Flash config (the planner dispatches on this)."""
    return getattr(args, "model_type", "") == MODEL_TYPE


@dataclass
class NextArgs:
    model_type: str = MODEL_TYPE
    vocab_size: int = 154880
    hidden_size: int = 4096
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 45
    num_nextn_predict_layers: int = 1  # the MTP block (layer 45 of the checkpoint); not a reference key
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 288
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 256
    v_head_dim: int = 256
    attention_bias: bool = False
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    index_kpool: int = 16
    index_kpool_always_select_tail: bool = True
    linear_num_heads: int = 64
    linear_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    hc_mult: int = 4
    max_position_embeddings: int = 1048576
    layer_types: list | None = None
    mlp_layer_types: list | None = None
    indexer_types: list | None = None
    tie_word_embeddings: bool = False
    kv_cache_bits: int | None = None  # --kv-bits: the DSA latent as codes (same layout as GLM-5.1's)
    index_cache_bits: int | None = None  # not supported here; kept for the planner's shared code
    quantization: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, config: dict) -> "NextArgs":
        config = dict(config)
        text = config.pop("text_config", None) or {}
        config.pop("vision_config", None)
        merged = {**config, **text, "model_type": MODEL_TYPE} if text else config
        lin = merged.get("linear_attn_config") or {}
        for key, ours in (("head_dim", "linear_head_dim"), ("num_heads", "linear_num_heads"),
                          ("short_conv_kernel_size", "linear_conv_kernel_dim")):
            if key in lin:
                merged.setdefault(ours, lin[key])
        params = inspect.signature(cls).parameters
        args = cls(**{k: v for k, v in merged.items() if k in params and k != "extra"})
        args.extra = {k: v for k, v in merged.items() if k not in params}
        return args

    @classmethod
    def from_file(cls, path: str | Path) -> "NextArgs":
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None

    def __post_init__(self):
        if self.model_type not in (MODEL_TYPE, MODEL_TYPE + "_text"):
            raise ConfigError(f"model_type is {self.model_type!r}, expected {MODEL_TYPE!r}")
        self.model_type = MODEL_TYPE
        n = self.num_hidden_layers
        # The same schedules as Glm5NextTextConfig.__post_init__ (3 KDA : 1 DSA; 3 dense MLP layers).
        if self.layer_types is None:
            self.layer_types = [KDA if i % 4 != 3 else DSA for i in range(n)]
        self.layer_types = [DSA if t in ("full_attention", "deepseek_sparse_attention") else t for t in self.layer_types]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense"] * min(3, n) + ["sparse"] * max(n - 3, 0)
        if self.indexer_types is None:
            self.indexer_types = ["full"] * n
        self._validate()

    def _validate(self):
        def bad(key, value, why):
            raise ConfigError(f"{key}={value!r}: {why}")

        n = self.num_hidden_layers
        for key in ("layer_types", "mlp_layer_types", "indexer_types"):
            if len(getattr(self, key)) != n:
                bad(key, getattr(self, key)[:4], f"needs {n} entries")
        if set(self.layer_types) - {KDA, DSA}:
            bad("layer_types", sorted(set(self.layer_types)), f"entries must be {KDA!r} or {DSA!r}")
        if set(self.mlp_layer_types) - {"dense", "sparse"}:
            bad("mlp_layer_types", sorted(set(self.mlp_layer_types)), "entries must be 'dense' or 'sparse'")
        if self.qk_rope_head_dim:
            bad("qk_rope_head_dim", self.qk_rope_head_dim, "GLM-5.3-Flash's DSA layers are NoPE (0)")
        if self.index_kpool < 1 or self.index_topk % self.index_kpool:
            bad("index_kpool", self.index_kpool, f"must divide index_topk={self.index_topk}")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", self.num_key_value_heads, "must equal num_attention_heads (MLA)")
        if self.num_nextn_predict_layers not in (0, 1):
            bad("num_nextn_predict_layers", self.num_nextn_predict_layers, "0 or 1 supported")
        if self.kv_cache_bits not in KV_CACHE_BITS or (self.kv_cache_bits and self.kv_lora_rank % 32):
            bad("kv_cache_bits", self.kv_cache_bits, "None, 8 or 4 (with kv_lora_rank a multiple of 32)")
        if self.index_cache_bits:
            bad("index_cache_bits", self.index_cache_bits, "an 8-bit indexer cache is GLM-5.1's; not modelled here")

    # --- layers -------------------------------------------------------------------------------
    def is_dsa(self, layer: int) -> bool:
        """DSA (MLA + indexer) layer; the MTP layer (index num_hidden_layers) is one."""
        return layer >= self.num_hidden_layers or self.layer_types[layer] == DSA

    def has_indexer(self, layer: int) -> bool:
        return self.is_dsa(layer) and (layer >= self.num_hidden_layers or self.indexer_types[layer] == "full")

    def layers(self, mtp: bool) -> range:
        return range(self.num_hidden_layers + (1 if mtp and self.num_nextn_predict_layers else 0))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def linear_dim(self) -> int:
        return self.linear_num_heads * self.linear_head_dim

    @property
    def kv_cache_group_size(self) -> int:
        return 64 if self.kv_lora_rank % 64 == 0 else 32

    @property
    def selected_tokens(self) -> int:
        """Keys a DSA query attends past index_topk: the top-k pools plus the unfinished tail pool."""
        return self.index_topk + (self.index_kpool - 1 if self.index_kpool_always_select_tail else 0)

    # --- the cache contract (see the module docstring) -------------------------------------------
    def latent_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        C, R = self.kv_lora_rank, self.qk_rope_head_dim
        if self.kv_cache_bits:
            return C * self.kv_cache_bits // 8 + 2 * (C // self.kv_cache_group_size) * dtype_bytes + R * dtype_bytes
        return (C + R) * dtype_bytes

    def indexer_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """The indexer's key and pool gate per token, plus a pooled key per index_kpool tokens."""
        return 2 * self.index_head_dim * dtype_bytes + self.index_head_dim * dtype_bytes // self.index_kpool

    def layer_bytes_per_token(self, layer: int, dtype_bytes: int = 2) -> int:
        if not self.is_dsa(layer):
            return 0
        return self.latent_bytes_per_token(dtype_bytes) + (self.indexer_bytes_per_token(dtype_bytes)
                                                            if self.has_indexer(layer) else 0)

    def cache_bytes_per_token(self, dtype_bytes: int = 2, mtp: bool = False) -> int:
        """Per-token cache bytes over all layers: DSA layers only (KDA layers hold a fixed state)."""
        return sum(self.layer_bytes_per_token(l, dtype_bytes) for l in self.layers(mtp))

    def kda_state_bytes(self, dtype_bytes: int = 2) -> int:
        """One KDA layer's state per sequence: conv window + float32 delta-rule state."""
        conv = (self.linear_conv_kernel_dim - 1) * 3 * self.linear_dim * dtype_bytes
        return conv + self.linear_num_heads * self.linear_head_dim ** 2 * STATE_BYTES

    def layer_state_bytes(self, layer: int, dtype_bytes: int = 2) -> int:
        return 0 if self.is_dsa(layer) else self.kda_state_bytes(dtype_bytes)

    def state_bytes(self, dtype_bytes: int = 2, mtp: bool = False) -> int:
        """Per-sequence cache bytes that do not grow with the context (the KDA layers' states)."""
        return sum(self.layer_state_bytes(l, dtype_bytes) for l in self.layers(mtp))

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.extra.get("eos_token_id")
        return [] if e is None else ([e] if isinstance(e, int) else list(e))


def state_bytes(args, dtype_bytes: int = 2, mtp: bool = True) -> int:
    """Per-sequence cache bytes independent of the context: GLM-5.3-Flash's KDA states; 0 for GLM-5.1."""
    return args.state_bytes(dtype_bytes, mtp) if is_next(args) else 0


def layer_cache_bytes(args, layer: int, rows: int, dtype_bytes: int = 2) -> int:
    """One decoder layer's cache for `rows` tokens (a pipeline stage's share), GLM-5.1 or GLM-5.3-Flash."""
    if is_next(args):  # DSA layers grow with the context, KDA layers hold a fixed state
        return args.layer_bytes_per_token(layer, dtype_bytes) * rows + args.layer_state_bytes(layer, dtype_bytes)
    return (args.latent_bytes_per_token(dtype_bytes)
            + (args.indexer_bytes_per_token(dtype_bytes) if args.has_indexer(layer) else 0)) * rows


def config_model_type(config: dict) -> str:
    """model_type of a config.json, looking into text_config for multimodal checkpoints."""
    t = str(config.get("model_type", ""))
    inner = (config.get("text_config") or {}).get("model_type", "")
    return MODEL_TYPE if MODEL_TYPE in (t, str(inner).removesuffix("_text")) else t
