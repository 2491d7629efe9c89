"""Pipeline parallelism: two ranks over the ring backend on loopback (`mlx.launch -n 2`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from reference import add_mtp_layer, make_reference, write_tokenizer

from glm_mlx import ModelArgs, load_model
from glm_mlx.generation.engine import Engine
from glm_mlx.cli.launch import mlx_launch
from glm_mlx.distributed.split import split_layers
from glm_mlx.quantize.pipeline_plan import launch_plan, layer_ranges, parse_macs
from glm_mlx.quantize.this_mac import detect_mac

# mlx.launch is found where `glm-mlx launch` finds it: beside this Python (a venv need not be on PATH).
MLX_LAUNCH = mlx_launch()
pytestmark = pytest.mark.skipif(MLX_LAUNCH is None, reason="mlx is installed without mlx.launch")
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
    cmd = [MLX_LAUNCH, "--backend", "ring", "-n", "2", "--python", sys.executable, *args]
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
    r, results = run_worker(ckpt, tmp_path / "out")  # the library's default split: equal layer groups
    assert len(results) == 2, r.stdout + r.stderr
    assert results[0]["mtp=False"] == expected[False]
    assert results[0]["mtp=True"] == expected[True]
    assert results[0]["ranges"] == [list(x) for x in split_layers(ModelArgs.from_file(ckpt), 2)]
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


RANK_LINE = re.compile(r"pipeline rank (\d)/2 on .*: layers (\d+)-(\d+), weights (\d+) bytes \(planned (\d+)\)")


def _launch_generate(ckpt, *launch_args):
    r = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "launch", "-n", "2", *launch_args, "--", "generate",
                        str(ckpt), "-p", "hello", "-m", "24", "--json"], capture_output=True, text=True, timeout=180)
    ranks = {int(m[1]): ((int(m[2]), int(m[3]) + 1), int(m[4]), int(m[5])) for m in RANK_LINE.finditer(r.stdout + r.stderr)}
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and len(lines) == 1 and sorted(ranks) == [0, 1], r.stdout + r.stderr  # only rank 0 talks
    return json.loads(lines[0])["text"], [ranks[0], ranks[1]]


def test_launch_runs_the_planners_split(ckpt):
    """`glm-mlx launch --macs A,B -- generate`: the ranks split the layers exactly as the planner does
    for those Macs (not equal layer counts), each rank's resident weights equal the plan's, and rank 0
    prints the same text as a single process."""
    single = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "generate", str(ckpt), "-p", "hello",
                             "-m", "24", "--json"], capture_output=True, text=True, timeout=120)
    expected = json.loads(single.stdout)["text"]
    macs = "m3-ultra-512,m1-pro-16"
    plan = launch_plan(ckpt, parse_macs(macs))
    assert layer_ranges(plan) != split_layers(ModelArgs.from_file(ckpt), 2)  # the plan is not the equal split
    text, ranks = _launch_generate(ckpt, "--macs", macs)
    assert text == expected
    assert [rng for rng, _, _ in ranks] == layer_ranges(plan)
    for (_, resident, planned), stage in zip(ranks, plan.stages):
        assert resident == planned == stage.weights_bytes


def test_launch_without_macs_plans_for_the_detected_machines(ckpt):
    """No --macs: each rank detects its machine, the ranks share what they found, and all plan the same split."""
    me = detect_mac()
    plan = launch_plan(ckpt, [me, me])
    _, ranks = _launch_generate(ckpt)
    assert [rng for rng, _, _ in ranks] == layer_ranges(plan)
    assert [resident for _, resident, _ in ranks] == [s.weights_bytes for s in plan.stages]


def test_fit_prints_the_split_launch_runs(ckpt, tmp_path):
    """For a converted checkpoint, `glm-mlx fit --model M --pipeline A,B` shows the layers launch will run."""
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for macs in ("m3-ultra-512,m3-ultra-512", "m1-pro-16,m3-ultra-512", "m3-ultra-512,m4-max-128,m1-pro-16"):
        r = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "fit", "--model", str(tmp_path), "--pipeline", macs,
                            "--json"], capture_output=True, text=True, timeout=60)
        stages = json.loads(r.stdout)["pipeline"]["stages"]
        assert [(a, b + 1) for a, b in (s["layers"] for s in stages)] == layer_ranges(launch_plan(tmp_path, parse_macs(macs)))
