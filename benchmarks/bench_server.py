"""Serving speed: an agent-like workload over HTTP against `glm-mlx serve` and `mlx_lm.server`,
same checkpoint, same run, with the ratios printed.

    python benchmarks/bench_server.py                      # glm-mini, both servers
    python benchmarks/bench_server.py --no-mlx-lm --sessions 4 --turns 3

Workload (OpenAI chat API, streamed, greedy, thinking off; the agent turns ask for logprobs so that
every token's chunk is seen, also when the model starts with tool-call markup a server holds back):
  1. throughput: for n = 4 and 8, n requests one by one, then n more like them (fresh prompts: no
     cache hits) at once; aggregate generated tok/s of the concurrent wave over the one-by-one wave,
     in --reps rounds (medians: a shared 2-core machine has bursts of noise);
  2. agent sessions: every session shares a system prompt + tool schemas, then a conversation grows
     turn by turn (user message, the model's reply appended as it came: its tool calls, and a result
     for each, as an agent sends them back); sessions run two at a time. TTFT per
     turn: cold (nothing cached; the first session's first turn and two like it with renamed
     tools), first turn of a later session (the shared prefix cached), warm
     continuations; then the server restarts and every session takes one more turn (glm-mlx: from
     its SSD prefix cache; mlx-lm keeps its cache in RAM only).
It reports TTFT p50/p95 per kind of turn, prompt tokens served from RAM / disk / computed (glm-mlx
reports the split in usage.prompt_tokens_details; mlx-lm reports cached_tokens), and the ratios.
On the CPU backend mlx-lm needs a float32 copy (its gather_mm); glm-mlx serves the same copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py: the BLAS/backend line)

WORDS = (ROOT / "tests" / "data" / "glm_mini_heldout.txt").read_text().split()


def text(n_words: int, seed: int) -> str:
    """Deterministic prose-like filler of about n_words words (held-out text, rotated by seed)."""
    start = (seed * 7919) % len(WORDS)
    return " ".join((WORDS * 3)[start : start + n_words])


def tools(n: int, prefix: str = "") -> list[dict]:
    return [{"type": "function", "function": {
        "name": f"{prefix}tool_{i}", "description": text(30, 100 + i),
        "parameters": {"type": "object", "properties": {f"arg_{j}": {"type": "string", "description": text(6, i * 10 + j)}
                                                         for j in range(4)}, "required": ["arg_0"]}}}
            for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind: str, model: Path, cache_dir: Path, log: Path):
        self.kind, self.model, self.cache_dir, self.log = kind, model, cache_dir, log
        self.proc = None

    def start(self):
        self.port = free_port()
        if self.kind.startswith("glm-mlx"):
            # 64-token blocks: glm-mini's whole context is 4K tokens (256 would be GLM-5.1's 0.1% of 200K)
            cmd = [sys.executable, "-m", "glm_mlx.cli.app", "serve", str(self.model), "--port", str(self.port),
                   "--cache-dir", str(self.cache_dir), "--cache-block", "64", "--max-batch", "8", "--no-reasoning"]
            cmd += ["--no-mtp"] if self.kind.endswith("no-mtp") else []
        else:
            cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(self.model), "--port", str(self.port),
                   "--decode-concurrency", "8", "--prompt-concurrency", "8",
                   "--chat-template-args", json.dumps({"enable_thinking": False})]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "a"), cwd=ROOT)
        import urllib.request

        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} server exited; see {self.log}")
                time.sleep(0.5)
        raise RuntimeError(f"{self.kind} server did not start; see {self.log}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def client(self):
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0, timeout=600)
        client.model_name = str(self.model)  # mlx_lm.server looks a request's model up by name
        return client


def ask(client, messages, max_tokens: int, tool_list=None, logprobs: bool = False) -> dict:
    """One streamed greedy chat request: TTFT, text, token counts (from usage)."""
    t0 = time.perf_counter()
    ttft, out, usage = None, [], None
    kwargs = {"tools": tool_list} if tool_list else {}
    # logprobs: every generated token comes with a chunk, also while a server holds back text that may be
    # tool-call markup, so the first token's time is seen whatever the model writes first (glm-mlx decodes
    # such a request without MTP; TTFT is prefill).
    stream = client.chat.completions.create(
        model=client.model_name, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        logprobs=logprobs, **kwargs)
    calls: dict[int, dict] = {}  # tool-call index -> the call as an assistant message carries it
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            piece = (d.content or "") + (getattr(d, "reasoning_content", None) or getattr(d, "reasoning", None) or "")
            if ttft is None and (piece or (c.logprobs and c.logprobs.content) or d.tool_calls):
                ttft = time.perf_counter() - t0
            out.append(piece)
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                call["id"] += tc.id or ""
                call["function"]["name"] += (tc.function and tc.function.name) or ""
                call["function"]["arguments"] += (tc.function and tc.function.arguments) or ""
    wall = time.perf_counter() - t0
    details = (usage.prompt_tokens_details.model_dump() if usage and usage.prompt_tokens_details else {}) or {}
    cached = details.get("cached_tokens") or 0
    return {"ttft": ttft if ttft is not None else wall, "wall": wall, "text": "".join(out),
            "tool_calls": [calls[i] for i in sorted(calls)],
            "prompt": usage.prompt_tokens if usage else 0, "completion": usage.completion_tokens if usage else 0,
            "cached": cached, "disk": details.get("disk_cached_tokens") or 0}


def wave(client, prompts, max_tokens, concurrent: bool) -> tuple[float, int]:
    """(seconds, generated tokens) for the prompts one by one or all at once."""
    results = [None] * len(prompts)

    def run(i):
        results[i] = ask(client, [{"role": "user", "content": prompts[i]}], max_tokens)

    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        [t.start() for t in threads]
        [t.join() for t in threads]
    else:
        for i in range(len(prompts)):
            run(i)
    return time.perf_counter() - t0, sum(r["completion"] for r in results)


def throughput(server: Server, max_tokens: int, seed: int, reps: int) -> dict:
    """Per n (4, 8): `reps` rounds, each the n requests one by one and then n fresh ones at once (fresh
    prompts every round: no cache hits). A round's ratio compares waves run seconds apart; the
    medians over rounds stand against a shared machine's bursts of noise."""
    client = server.client()
    ask(client, [{"role": "user", "content": "warm up"}], 8)
    out = {}
    for n in (4, 8):
        rounds = []
        for r in range(reps):
            base = seed + 1000 * n + 100 * r
            t1, g1 = wave(client, [text(40, base + i) for i in range(n)], max_tokens, concurrent=False)
            tn, gn = wave(client, [text(40, base + 50 + i) for i in range(n)], max_tokens, concurrent=True)
            rounds.append({"one_by_one_tps": g1 / t1, "concurrent_tps": gn / tn, "ratio": (gn / tn) / (g1 / t1)})
        med = {k: statistics.median(x[k] for x in rounds) for k in ("one_by_one_tps", "concurrent_tps", "ratio")}
        out[n] = {**med, "ratio_min": min(x["ratio"] for x in rounds), "ratio_max": max(x["ratio"] for x in rounds),
                  "rounds": rounds}
    return out


def sessions(server: Server, n_sessions: int, turns: int, system_words: int, n_tools: int, turn_words: int,
             max_tokens: int) -> list[dict]:
    """The agent workload; returns one record per turn (kind, ttft, prompt/cached/disk tokens)."""
    system = {"role": "system", "content": text(system_words, 1)}
    tool_list = tools(n_tools)
    convs = [[system] for _ in range(n_sessions)]
    records = []
    clients = {}  # one client per session, kept across turns (keep-alive), as an agent keeps its own

    def turn(s: int, t: int, kind: str):
        convs[s].append({"role": "user", "content": text(turn_words, 10 * s + t + 2)})
        if (s, server.port) not in clients:
            clients[(s, server.port)] = server.client()
        r = ask(clients[(s, server.port)], convs[s], max_tokens, tool_list, logprobs=True)
        # As an agent goes on: the assistant turn as it came (tool calls included), each call's result.
        convs[s].append({"role": "assistant", "content": r["text"], **({"tool_calls": r["tool_calls"]} if r["tool_calls"] else {})})
        convs[s] += [{"role": "tool", "tool_call_id": c["id"], "content": '{"status": "ok"}'} for c in r["tool_calls"]]
        records.append({"session": s, "turn": t, "kind": kind, **{k: r[k] for k in ("ttft", "prompt", "cached", "disk")}})

    # Two more cold prompts, the first session's with its tools renamed (the template puts the tools
    # first: nothing after the first name is shared) and a user message of its own: cold is the
    # denominator of every share, and one sample moves with every burst of a shared machine's noise.
    for i in range(2):
        msgs = [system, {"role": "user", "content": text(turn_words, 200 + i)}]
        r = ask(server.client(), msgs, max_tokens, tools(n_tools, prefix=f"probe{i}_"), logprobs=True)
        records.append({"session": -1, "turn": 0, "kind": "cold", **{k: r[k] for k in ("ttft", "prompt", "cached", "disk")}})
    turn(0, 0, "cold")
    for s in range(1, n_sessions):
        turn(s, 0, "shared prefix")
    for t in range(1, turns):
        for s in range(0, n_sessions, 2):  # two sessions at a time
            pair = [threading.Thread(target=turn, args=(x, t, "warm")) for x in (s, s + 1) if x < n_sessions]
            [p.start() for p in pair]
            [p.join() for p in pair]
    server.stop()
    server.start()
    ask(server.client(), [{"role": "user", "content": "warm up"}], 4)  # a fresh process's first request
    for s in range(n_sessions):
        turn(s, turns, "after restart")
    return records


def summary(records: list[dict]) -> dict:
    out = {}
    for kind in ("cold", "shared prefix", "warm", "after restart"):
        ttfts = sorted(r["ttft"] for r in records if r["kind"] == kind)
        if not ttfts:
            continue
        rs = [r for r in records if r["kind"] == kind]
        out[kind] = {"n": len(ttfts), "p50": statistics.median(ttfts),
                     "p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
                     "prompt": sum(r["prompt"] for r in rs), "ram": sum(r["cached"] - r["disk"] for r in rs),
                     "disk": sum(r["disk"] for r in rs), "computed": sum(r["prompt"] - r["cached"] for r in rs)}
    return out


def float32_copy(model: Path, out: Path) -> Path:
    """Every tensor of the checkpoint cast to float32, the MTP layer included (mlx_lm convert drops it:
    glm-mlx would then serve without MTP). mlx-lm loads the same files (its sanitize drops the MTP layer)."""
    import mlx.core as mx

    marker = out / "config.json"
    if marker.exists() and max(f.stat().st_mtime for f in model.glob("*.safetensors")) > marker.stat().st_mtime:
        shutil.rmtree(out)
    if not marker.exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in model.iterdir():
            if f.suffix == ".safetensors":
                mx.save_safetensors(str(out / f.name), {k: v.astype(mx.float32) for k, v in mx.load(str(f)).items()},
                                    metadata={"format": "pt"})
            elif f.is_file() and f.name != "config.json":
                shutil.copy(f, out / f.name)
        config = json.loads((model / "config.json").read_text())
        marker.write_text(json.dumps({**config, "dtype": "float32", "torch_dtype": "float32"}, indent=1))
    return out


def projection(turn_tokens: int = 200, contexts=(8192, 32768, 100_000)):
    """The same kinds of turn and waves for GLM-5.1 on an M3 Ultra 512 GB, from the planner's speed model."""
    from glm_mlx.quantize.macs import get_mac
    from glm_mlx.quantize.planner import glm51_args
    from glm_mlx.quantize.recipe import default_recipe
    from glm_mlx.quantize.serving import SSD_READ_GBS, batch_decode_tok_s, prefill_seconds

    args, recipe, mac = glm51_args(), default_recipe(), get_mac("m3-ultra-512")
    per_token = args.cache_bytes_per_token(2, mtp=True)
    print("\n## Projected: GLM-5.1 (default recipe, 360 GB) on an M3 Ultra 512 GB, planner speed model")
    print(f"| conversation | cold TTFT | warm turn (+{turn_tokens} tokens, RAM) | % of cold | after restart (SSD at "
          f"{SSD_READ_GBS:g} GB/s) | % of cold |")
    print("|---|---|---|---|---|---|")
    for ctx in contexts:
        cold = prefill_seconds(args, recipe, mac, ctx, ctx)
        warm = prefill_seconds(args, recipe, mac, turn_tokens, ctx)
        disk = warm + (ctx - turn_tokens) * per_token / (SSD_READ_GBS * 1e9)
        print(f"| {ctx:,} tokens | {cold:,.0f} s | {warm:.1f} s | {100 * warm / cold:.2f}% | {disk:.1f} s | "
              f"{100 * disk / cold:.2f}% |")
    print("| sequences decoding together (32K context each) | 1 | 2 | 4 | 8 |")
    print("|---|---|---|---|---|")
    for label, acc in (("plain passes", None), (f"MTP passes (acceptance {MTP_ACCEPTANCE:g})", MTP_ACCEPTANCE)):
        tps = [batch_decode_tok_s(args, recipe, mac, b, 32768, acceptance=acc) for b in (1, 2, 4, 8)]
        one = batch_decode_tok_s(args, recipe, mac, 1, 32768)
        print(f"| aggregate tok/s, {label} (vs plain one at a time) | "
              + " | ".join(f"{t:.1f} ({t / one:.2f}x)" for t in tps) + " |")


# GLM-5.x's acceptance of a first draft, reported on GPU servers (shared/reference notes: 0.89)
MTP_ACCEPTANCE = 0.89


def main():
    print(describe(), flush=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "glm_mlx" / "data" / "glm-mini")
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-words", type=int, default=500, help="shared system prompt size (words; with the tools about 2,700 tokens)")
    p.add_argument("--tools", type=int, default=6, help="tool schemas in the shared prefix")
    p.add_argument("--turn-words", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=7, help="rounds of each throughput wave (medians reported)")
    p.add_argument("--no-mlx-lm", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--project-only", action="store_true", help="print the GLM-5.1 projection and exit")
    a = p.parse_args()
    if a.project_only:
        projection()
        return
    work = Path(tempfile.mkdtemp(prefix="bench_server_"))
    model = float32_copy(a.model, ROOT / "build" / "bench" / f"{a.model.name}-f32")
    results = {}
    # glm-mlx decodes a lone sequence with MTP and a batch without: the no-MTP run measures what MTP adds.
    for kind in ["glm-mlx", "glm-mlx-no-mtp"] + ([] if a.no_mlx_lm else ["mlx-lm"]):
        cache = work / kind / "cache"
        cache.mkdir(parents=True)
        server = Server(kind, model, cache, work / f"{kind}.log").start()
        try:
            print(f"[{kind}] throughput ...", file=sys.stderr, flush=True)
            tp = throughput(server, a.max_tokens, seed=0, reps=a.reps)
            recs = []
            if kind != "glm-mlx-no-mtp":
                print(f"[{kind}] agent sessions ...", file=sys.stderr, flush=True)
                recs = sessions(server, a.sessions, a.turns, a.system_words, a.tools, a.turn_words, a.max_tokens)
        finally:
            server.stop()
        results[kind] = {"throughput": tp, "turns": summary(recs), "records": recs}
    report(results)
    projection()
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def report(results: dict):
    kinds = list(results)
    print("\n## Throughput: aggregate generated tok/s, concurrent over the same requests one by one "
          "(medians over rounds; the ratio's range in brackets)")
    print("| server | 1-by-1 tok/s (4 req) | 4 concurrent | ratio | 1-by-1 tok/s (8 req) | 8 concurrent | ratio |")
    print("|---|---|---|---|---|---|---|")
    for k in kinds:
        t = results[k]["throughput"]
        cells = [f"{t[n]['one_by_one_tps']:.1f} | {t[n]['concurrent_tps']:.1f} | **{t[n]['ratio']:.2f}x** "
                 f"({t[n]['ratio_min']:.2f}-{t[n]['ratio_max']:.2f})" for n in (4, 8)]
        print(f"| {k} | {cells[0]} | {cells[1]} |")
    print("\n## Agent sessions: TTFT per turn (seconds) and prompt tokens by source")
    print("| server | turn | n | TTFT p50 | TTFT p95 | % of cold p50 | prompt tokens | from RAM | from disk | computed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in kinds:
        s = results[k]["turns"]
        if not s:
            continue
        cold = s["cold"]["p50"]
        for kind, v in s.items():
            print(f"| {k} | {kind} | {v['n']} | {v['p50']:.3f} | {v['p95']:.3f} | {100 * v['p50'] / cold:.1f}% | "
                  f"{v['prompt']:,} | {v['ram']:,} | {v['disk']:,} | {v['computed']:,} |")
    if "mlx-lm" in results:
        g, m = results["glm-mlx"], results["mlx-lm"]
        print("\n## glm-mlx / mlx-lm")
        for kind in [k for k in ("glm-mlx", "glm-mlx-no-mtp") if k in results]:
            for n in (4, 8):
                t, tm = results[kind]["throughput"][n], m["throughput"][n]
                print(f"- {kind}, {n} concurrent: batching gain {t['ratio']:.2f}x vs {tm['ratio']:.2f}x; "
                      f"aggregate tok/s {t['concurrent_tps'] / tm['concurrent_tps']:.2f}x")
        for kind in ("warm", "after restart"):
            gp = g["turns"][kind]["p50"] / g["turns"]["cold"]["p50"]
            mp = m["turns"][kind]["p50"] / m["turns"]["cold"]["p50"]
            print(f"- {kind} TTFT as a share of cold: {100 * gp:.1f}% vs {100 * mp:.1f}%")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
