"""The planner against measured memory (issue #6): on a tiny converted checkpoint, MLX's peak
memory while generating at a context is within 10% of the plan (weights + KV cache + working set)."""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest
from convert_fixtures import make_source
from mlx.utils import tree_flatten

from glm_mlx import load_model
from glm_mlx.model.config import ModelArgs
from glm_mlx.generation.engine import Engine
from glm_mlx.quantize.converter import convert
from glm_mlx.quantize.inventory import model_dtype_bytes
from glm_mlx.quantize.macs import get_mac
from glm_mlx.quantize.planner import plan
from glm_mlx.quantize.recipe import Recipe

# Three decoder layers and the MTP layer; a wide latent (large KV rows) and index_topk 64, so a
# 1K context runs the indexer and sparse attention in every layer.
DIMS = dict(vocab_size=2048, hidden_size=64, moe_intermediate_size=64, num_hidden_layers=3,
            max_position_embeddings=4096, index_topk=64, kv_lora_rank=512, index_n_heads=4, index_head_dim=64)
# Routed experts quantized: they run through gather_qmm, so the CPU backend keeps the checkpoint's
# bf16 (an unquantized expert would make loading.py upcast everything to float32).
RECIPE = Recipe.from_dict({"default": "bf16", "rules": [{"component": "routed experts", "format": "affine4g64"}]})
PROMPT, NEW = 1021, 3
CONTEXT = PROMPT + NEW


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("planner_memory")
    convert(make_source(root / "src", shards=1, **DIMS), root / "out", RECIPE)
    return root / "out"


@pytest.mark.parametrize("mtp", [True, False], ids=["mtp", "no-mtp"])
@pytest.mark.parametrize("chunk", [1024, 16], ids=["chunk-peak", "cache-peak"])
def test_measured_peak_is_within_10_percent_of_the_plan(ckpt, chunk, mtp):
    args = ModelArgs.from_file(ckpt)
    gc.collect()
    mx.synchronize()
    before = mx.get_active_memory()  # whatever other tests left alive
    model = load_model(ckpt, mtp=mtp)
    mx.synchronize()
    mx.reset_peak_memory()
    weights = mx.get_active_memory() - before
    prompt = [(7 * i) % (args.vocab_size - 16) + 16 for i in range(PROMPT)]
    assert len(list(Engine(model, mtp=mtp, prefill_step=chunk).generate(prompt, max_tokens=NEW))) == NEW
    measured = mx.get_peak_memory() - before

    p = plan(args, RECIPE, get_mac("m3-ultra-512"), context=CONTEXT, mtp=mtp, prefill_chunk=chunk)
    predicted = p.weights_bytes + p.kv_bytes + p.working_set_bytes  # the plan's total, no OS allowance
    # The runtime holds what the planner priced, in the dtype it priced activations in.
    assert sum(v.nbytes for _, v in tree_flatten(model.parameters())) == p.weights_bytes
    assert weights == pytest.approx(p.weights_bytes, rel=0.02)  # (+ a few small arrays made while loading)
    assert model.model.norm.weight.dtype.size == model_dtype_bytes(args) == 2
    assert measured == pytest.approx(predicted, rel=0.10), (measured, predicted, p.working_set)
    # The check has teeth: weights alone are far from the peak, and so is the plan without the
    # part that dominates (a whole prefill chunk's working set, or the KV cache).
    assert p.weights_bytes < 0.9 * measured
    if chunk == 1024:
        assert p.working_set_bytes > p.kv_bytes + p.weights_bytes
        assert predicted - p.working_set_bytes < 0.9 * measured
    else:
        assert p.kv_bytes > max(p.working_set_bytes, p.weights_bytes)
        assert predicted - p.kv_bytes < 0.9 * measured
