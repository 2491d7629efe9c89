"""ModelArgs: a GLM-5.x (`glm_moe_dsa`) config.json with the Hugging Face key names.

Unknown keys are dropped; values the model cannot honour raise `ConfigError` naming the key.
The analytic costs here (cache bytes per token) are what the planner and the tests check
against real `nbytes`.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def config_dtype(config: dict) -> str:
    """The model dtype a config.json names ("dtype", or the older "torch_dtype"): "bfloat16", "float16"
    or "float32"; bfloat16 when it names none of them."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return name if name in ("bfloat16", "float16", "float32") else "bfloat16"

MODEL_TYPE = "glm_moe_dsa"
# mlx-lm's initialize_rope understands these; anything else is refused up front.
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "deepseek_yarn", "llama3")
KV_CACHE_BITS = (None, 8, 4)  # latent KV cache: model dtype, or mx.quantize codes of these bits


def read_config_json(path: str | Path) -> dict:
    """A checkpoint folder's config.json (or a config file) as a dict; ConfigError if absent or not JSON."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"no config.json at {path}", "Pass a checkpoint folder or a config.json file.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def indexer_schedule(n: int, pattern: Any, freq: Any, offset: Any) -> list:
    """indexer_types from the IndexCache keys, as transformers' GlmMoeDsaConfig and Glm5NextTextConfig
    derive them: `index_topk_pattern` ("FSSF..." or a list) if given, else every `index_topk_freq`-th layer
    from `index_skip_topk_offset` on runs its own indexer ("full"), the others reuse one ("shared")."""
    if pattern is not None:
        if not isinstance(pattern, str):
            return list(pattern)
        if set(pattern) - {"F", "S"}:
            raise ConfigError(f"index_topk_pattern={pattern!r}: only 'F' and 'S' are allowed")
        return [{"F": "full", "S": "shared"}[c] for c in pattern]
    freq, off = max(int(freq or 1), 1), int(offset)
    return ["full" if max(i - off + 1, 0) % freq == 0 else "shared" for i in range(n)]


def check_moe_groups(bad, n_routed_experts, n_group: int, topk_group: int, num_experts_per_tok: int) -> None:
    """The noaux_tc router both GLMs share (sigmoid scores, the top-2 of each group rank the groups)."""
    e, g = n_routed_experts or 0, n_group
    if e <= 0:
        bad("n_routed_experts", n_routed_experts, "MoE layers need routed experts")
    if g < 1 or e % g:
        bad("n_group", g, f"must divide n_routed_experts={e}")
    if not 1 <= topk_group <= g:
        bad("topk_group", topk_group, f"must be in 1..n_group={g}")
    if not 1 <= num_experts_per_tok <= topk_group * e // g:
        bad("num_experts_per_tok", num_experts_per_tok, "more experts than the selected groups hold")
    if g > 1 and e // g < 2:
        bad("n_group", g, "group scoring takes the top-2 experts of a group; groups need >= 2 experts")


def check_kv_cache_bits(bad, kv_cache_bits, kv_lora_rank: int) -> None:
    if kv_cache_bits not in KV_CACHE_BITS:
        bad("kv_cache_bits", kv_cache_bits, "only None (model dtype), 8 or 4 are supported")
    if kv_cache_bits and kv_lora_rank % 32:
        bad("kv_lora_rank", kv_lora_rank, "a quantized KV cache needs a multiple of 32 (the quantization group)")


def raise_bad(key, value, why):
    raise ConfigError(f"{key}={value!r}: {why}")


class ConfigArgs:
    """What GLM-5.1's ModelArgs and GLM-5.3-Flash's Glm5NextArgs share: reading a config.json (known keys
    to fields, the rest to `extra`) and the latent KV cache both keep (kv_lora_rank values a token,
    optionally `kv_cache_bits`-bit codes), with its analytic size."""

    @classmethod
    def from_dict(cls, config: dict):
        params = inspect.signature(cls).parameters
        args = cls(**{k: v for k, v in config.items() if k in params and k != "extra"})
        args.extra = {k: v for k, v in config.items() if k not in params}
        return args

    @classmethod
    def from_file(cls, path: str | Path):
        return cls.from_dict(read_config_json(path))

    def layers(self, mtp: bool = False) -> range:
        """The decoder layers' indices, and with `mtp` the MTP layer's (num_hidden_layers) if there is one."""
        return range(self.num_hidden_layers + (1 if mtp and self.num_nextn_predict_layers else 0))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @property
    def kv_cache_group_size(self) -> int:
        """Quantization group of the latent KV (kv_cache_bits): 64 where kv_lora_rank allows, else 32."""
        return 64 if self.kv_lora_rank % 64 == 0 else 32

    def latent_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """One layer's latent KV cache: kv_lora_rank latent + qk_rope_head_dim rope key (with
        kv_cache_bits: the latent's codes plus a scale and a bias per group, in the model dtype,
        and the rope key in the model dtype)."""
        C, R = self.kv_lora_rank, self.qk_rope_head_dim
        if self.kv_cache_bits:
            return C * self.kv_cache_bits // 8 + 2 * (C // self.kv_cache_group_size) * dtype_bytes + R * dtype_bytes
        return (C + R) * dtype_bytes


@dataclass
class ModelArgs(ConfigArgs):
    model_type: str = MODEL_TYPE
    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int = 2048
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    qk_nope_head_dim: int = 192
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 202752
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    rope_theta: float | None = None  # legacy key
    rope_scaling: dict | None = None  # legacy key
    rope_interleave: bool = True
    indexer_rope_interleave: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    mlp_layer_types: list | None = None
    indexer_types: list | None = None
    index_topk_freq: int = 1
    index_skip_topk_offset: int = 2
    index_topk_pattern: Any = None
    num_nextn_predict_layers: int = 0
    # Not an HF key: store indexer keys as 8-bit (per-key float32 scale and bias) instead of the
    # model dtype. Opt-in: it can change the top-k choice (see docs/long_context.md).
    index_cache_bits: int | None = None
    # Not an HF key: store each token's latent KV (kv_lora_rank values) as `kv_cache_bits`-bit codes
    # with a scale and bias per group (mlx's affine mx.quantize, group kv_cache_group_size, scales in
    # the model dtype); the rope key stays in the model dtype. None: the whole row in the model dtype.
    kv_cache_bits: int | None = None
    tie_word_embeddings: bool = False
    eos_token_id: Any = None
    bos_token_id: Any = None
    pad_token_id: Any = None
    quantization: dict | None = None  # mlx-lm convention: global settings + per-module overrides
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type != MODEL_TYPE:
            raise ConfigError(f"model_type is {self.model_type!r}, expected {MODEL_TYPE!r}")
        self._resolve_rope()
        self._resolve_layer_types()
        self._validate()

    # --- normalisation -------------------------------------------------------------------
    def _resolve_rope(self):
        # Newer configs carry `rope_parameters` (theta + scaling in one dict); older ones
        # `rope_theta` and `rope_scaling`. Fold both into rope_parameters.
        params = dict(self.rope_parameters or {})
        if self.rope_scaling:
            params = {**self.rope_scaling, **params}
        if "rope_theta" not in params:
            params["rope_theta"] = self.rope_theta if self.rope_theta is not None else 10000.0
        rope_type = params.get("rope_type", params.get("type", "default"))
        params["rope_type"] = rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        self.rope_parameters = params
        self.rope_theta = params["rope_theta"]

    def _resolve_layer_types(self):
        n = self.num_hidden_layers
        # Same schedule as transformers' GlmMoeDsaConfig.__post_init__ (IndexCache, GLM-5.2).
        if self.indexer_types is None:
            self.indexer_types = indexer_schedule(n, self.index_topk_pattern, self.index_topk_freq,
                                                  self.index_skip_topk_offset)
        if self.mlp_layer_types is None:
            if self.n_routed_experts:
                self.mlp_layer_types = [
                    "sparse" if i >= self.first_k_dense_replace and i % max(self.moe_layer_freq, 1) == 0 else "dense"
                    for i in range(n)
                ]
            else:
                self.mlp_layer_types = ["dense"] * n

    def _validate(self):
        bad = raise_bad
        if len(self.indexer_types) != self.num_hidden_layers:
            bad("indexer_types", self.indexer_types, f"needs {self.num_hidden_layers} entries")
        if set(self.indexer_types) - {"full", "shared"}:
            bad("indexer_types", self.indexer_types, "entries must be 'full' or 'shared'")
        if self.indexer_types and self.indexer_types[0] != "full":
            bad("indexer_types", self.indexer_types[:4], "layer 0 must be 'full' (a shared layer reuses an earlier one)")
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"dense", "sparse"}:
            bad("mlp_layer_types", self.mlp_layer_types, f"needs {self.num_hidden_layers} 'dense'/'sparse' entries")
        if "sparse" in self.mlp_layer_types:
            check_moe_groups(bad, self.n_routed_experts, self.n_group, self.topk_group, self.num_experts_per_tok)
        if self.scoring_func != "sigmoid":
            bad("scoring_func", self.scoring_func, "only 'sigmoid' is supported (GLM-5.x)")
        if self.topk_method not in ("noaux_tc",):
            bad("topk_method", self.topk_method, "only 'noaux_tc' is supported (GLM-5.x)")
        if self.hidden_act != "silu":
            bad("hidden_act", self.hidden_act, "only 'silu' is supported")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", self.num_key_value_heads,
                f"MLA expands one latent to every head; must equal num_attention_heads={self.num_attention_heads}")
        if self.q_lora_rank is None or self.q_lora_rank <= 0:
            bad("q_lora_rank", self.q_lora_rank, "the DSA indexer reads the q latent; q_lora_rank must be > 0")
        if self.qk_rope_head_dim > self.index_head_dim or self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", self.qk_rope_head_dim, f"must be even and <= index_head_dim={self.index_head_dim}")
        if self.index_topk < 1:
            bad("index_topk", self.index_topk, "must be >= 1")
        if self.index_cache_bits not in (None, 8):
            bad("index_cache_bits", self.index_cache_bits, "only None (model dtype) or 8 are supported")
        if self.index_cache_bits and self.index_head_dim not in (32, 64, 128):
            bad("index_head_dim", self.index_head_dim, "an 8-bit indexer cache needs 32, 64 or 128 (one scale per key)")
        check_kv_cache_bits(bad, self.kv_cache_bits, self.kv_lora_rank)
        if self.num_nextn_predict_layers not in (0, 1):
            bad("num_nextn_predict_layers", self.num_nextn_predict_layers, "GLM-5.x has one MTP layer; 0 or 1 supported")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", True, "GLM-5.x keeps a separate lm_head")

    # --- derived shapes --------------------------------------------------------------------
    def has_indexer(self, layer: int) -> bool:
        """Whether decoder layer `layer` has its own indexer (the MTP layer always does)."""
        return layer >= self.num_hidden_layers or self.indexer_types[layer] == "full"

    # --- analytic costs (checked against real nbytes by the tests) -------------------------
    def indexer_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """One full-indexer layer's indexer key cache: one index_head_dim key per token
        (8-bit: index_head_dim bytes plus a float32 scale and bias per key)."""
        if self.index_cache_bits:
            return self.index_head_dim * self.index_cache_bits // 8 + 2 * 4
        return self.index_head_dim * dtype_bytes

    def cache_bytes_per_token(self, dtype_bytes: int = 2, mtp: bool = False) -> int:
        """Cache bytes per token over all layers (and the MTP layer when `mtp`)."""
        return sum(self.latent_bytes_per_token(dtype_bytes)
                   + (self.indexer_bytes_per_token(dtype_bytes) if self.has_indexer(i) else 0)
                   for i in self.layers(mtp))
