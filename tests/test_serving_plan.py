"""The serving plan (`glm-mlx fit`'s Serving line, `glm-mlx serve`'s defaults): batch caches and the
prefix cache's RAM tier fit beside the weights, and the numbers add up."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from glm_mlx.cli.app import app
from glm_mlx.quantize.macs import get_mac
from glm_mlx.quantize.planner import glm51_args, plan
from glm_mlx.quantize.recipe import default_recipe
from glm_mlx.quantize.serving import DEFAULT_MAX_BATCH, serving_plan
from glm_mlx.quantize.working_set import cache_tokens


@pytest.mark.parametrize("context,max_batch", [(202_752, None), (32_768, None), (32_768, 3), (8192, 1)])
def test_serving_plan_adds_up(context, max_batch):
    p = plan(glm51_args(), default_recipe(), get_mac("m3-ultra-512"), context)
    s = serving_plan(p, max_batch)
    per_seq = p.kv_bytes_per_token * cache_tokens(context)
    assert s.batch_kv_bytes == s.max_batch * per_seq
    assert p.weights_bytes + p.working_set_bytes + s.batch_kv_bytes + s.prefix_cache_bytes <= s.limit_bytes
    assert s.prefix_cache_tokens == s.prefix_cache_bytes // p.kv_bytes_per_token
    if max_batch is None:
        room = s.limit_bytes - p.weights_bytes - p.working_set_bytes
        assert s.max_batch == min(DEFAULT_MAX_BATCH, room // per_seq)
        assert s.prefix_cache_bytes < per_seq or s.max_batch == DEFAULT_MAX_BATCH  # no room left for one more
    else:
        assert s.max_batch == max_batch


def test_fit_reports_serving():
    r = CliRunner().invoke(app, ["fit", "--context", "32768", "--max-batch", "4", "--json"])
    assert r.exit_code == 0, r.output
    serving = json.loads(r.stdout)["serving"]
    assert serving["max_batch"] == 4 and serving["prefix_cache_tokens"] > 1_000_000
    r = CliRunner().invoke(app, ["fit", "--context", "32768"])
    assert "Serving (glm-mlx serve): 8 sequences" in r.output and "prefix" in r.output


def test_projections_agree_with_the_planner():
    from glm_mlx.quantize.serving import batch_decode_tok_s, prefill_seconds

    args, recipe, mac = glm51_args(), default_recipe(), get_mac("m3-ultra-512")
    p = plan(args, recipe, mac, 32768)
    one = batch_decode_tok_s(args, recipe, mac, 1, 32768)
    assert one == pytest.approx(p.decode_tok_s, rel=0.02)  # a batch of one is the planner's decode
    tps = [batch_decode_tok_s(args, recipe, mac, b, 32768) for b in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(tps, tps[1:])) and tps[-1] < 16 * tps[0]  # more, but not for free
    assert prefill_seconds(args, recipe, mac, 32768, 32768) == pytest.approx(32768 / p.prefill_tok_s, rel=1e-6)
    warm = prefill_seconds(args, recipe, mac, 200, 32768)
    assert prefill_seconds(args, recipe, mac, 200, 200) <= warm < 32768 / p.prefill_tok_s / 50
    # MTP passes: 2 tokens per sequence verified, 1 + acceptance kept. With no draft accepted a pass
    # is pure cost; at GLM-5.1's reported acceptance it beats plain passes (weights dominate a pass).
    for b in (1, 4, 8):
        plain = batch_decode_tok_s(args, recipe, mac, b, 32768)
        assert batch_decode_tok_s(args, recipe, mac, b, 32768, acceptance=0.0) < plain
        assert batch_decode_tok_s(args, recipe, mac, b, 32768, acceptance=0.89) > plain
    assert batch_decode_tok_s(args, recipe, mac, 4, 32768, acceptance=0.89) == pytest.approx(
        4 * 1.89 / (8 / batch_decode_tok_s(args, recipe, mac, 8, 32768, mtp=True, acceptance=None)), rel=0.2)
