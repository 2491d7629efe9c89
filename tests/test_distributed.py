"""Pipeline parallelism: two ranks over the ring backend on loopback (`mlx.launch -n 2`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from reference import add_mtp_layer, make_reference, write_tokenizer

from glm_mlx import ModelArgs, load_model
from glm_mlx.engine import Engine
from glm_mlx.pipeline_split import split_layers
from glm_mlx.quantize.macs import custom_mac
from glm_mlx.quantize.planner import plan_pipeline
from glm_mlx.quantize.recipe import Recipe

pytestmark = pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")
WORKER = Path(__file__).parent / "dist" / "worker.py"
PROMPT = list(range(11, 41))  # 30 tokens: past index_topk (8)
N_TOKENS = 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist")
    # Shared-indexer layers too: a rank may only start on a full layer.
    ref = make_reference(path, seed=5, num_hidden_layers=6, index_topk_freq=2, index_skip_topk_offset=1)
    add_mtp_layer(path, ref, seed=6)
    write_tokenizer(path)
    return path


def launch(args, env=None, timeout=180):
    cmd = ["mlx.launch", "--backend", "ring", "-n", "2", "--python", sys.executable, *args]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def run_worker(ckpt, out, ranges=None, env=None):
    env = {"GLM_TEST_PROMPT": json.dumps(PROMPT), **(env or {})}
    if ranges is not None:
        env["GLM_TEST_RANGES"] = json.dumps(ranges)
    r = launch([str(WORKER), str(ckpt), str(out), str(N_TOKENS)], env)
    results = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in (0, 1)
               if Path(f"{out}.{rank}.json").exists()]
    return r, results


def test_split_never_starts_on_a_shared_layer(ckpt):
    args = ModelArgs.from_file(ckpt)
    for n in (2, 3):
        ranges = split_layers(args, n)
        assert ranges[0][0] == 0 and ranges[-1][1] == args.num_hidden_layers
        assert all(args.indexer_types[a] == "full" for a, _ in ranges)


def test_two_ranks_match_single_process(ckpt, tmp_path):
    model = load_model(ckpt, dtype=mx.float32)
    expected = {mtp: list(Engine(model, mtp=mtp, num_draft=2).generate(PROMPT, max_tokens=N_TOKENS))
                for mtp in (False, True)}
    args = ModelArgs.from_file(ckpt)
    # The planner's split and per-rank prediction (float32 weights, as loaded here).
    plan = plan_pipeline(args, Recipe.uniform("f32"), [custom_mac(64, 400)] * 2, context=64)
    ranges = [[s.layers[0], s.layers[1] + 1] for s in plan.stages]
    r, results = run_worker(ckpt, tmp_path / "out", ranges)
    assert len(results) == 2, r.stdout + r.stderr
    assert results[0]["mtp=False"] == expected[False]
    assert results[0]["mtp=True"] == expected[True]
    for res, stage in zip(results, plan.stages):
        assert res["ranges"] == ranges
        assert res["resident_bytes"] == stage.weights_bytes  # each rank holds what the planner priced
    assert results[0]["resident_bytes"] < sum(x["resident_bytes"] for x in results)


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sk in socks:
        sk.bind(("127.0.0.1", 0))
    ports = [sk.getsockname()[1] for sk in socks]
    for sk in socks:
        sk.close()
    return ports


def test_rank_dying_ends_the_others(ckpt, tmp_path):
    """Ranks started by hand (as mlx.launch does, minus its kill-all): rank 1 dies mid-generation,
    rank 0 stops with a clear error instead of hanging."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "GLM_TEST_PROMPT": json.dumps(PROMPT), "GLM_TEST_DIE_AT": "5"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(tmp_path / "dead"), str(N_TOKENS)],
                              env={**env, "MLX_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]  # bounded: a hang fails the test
    assert procs[1].returncode == 7
    assert procs[0].returncode != 0
    assert "DistributedError" in outs[0] and "connection to a peer was lost" in outs[0]
    assert not (tmp_path / "dead.0.json").exists()


def test_launch_generate_cli(ckpt):
    """`glm-mlx launch -n 2 -- generate`: rank 0 prints the same text as a single process."""
    single = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "generate", str(ckpt), "-p", "hello",
                             "-m", "24", "--json"], capture_output=True, text=True, timeout=120)
    expected = json.loads(single.stdout)["text"]
    r = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "launch", "-n", "2", "--", "generate", str(ckpt),
                        "-p", "hello", "-m", "24", "--json"], capture_output=True, text=True, timeout=180)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, r.stdout + r.stderr  # only rank 0 talks
    assert json.loads(lines[0])["text"] == expected
