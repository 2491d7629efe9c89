"""Sequences of different lengths decoding together: the DSA indexer's cost per layer and step.

    python benchmarks/bench_mixed_lengths.py [--long 100000] [--short 1000] [--rows 8] [--repeat 5]

A batch keeps every sequence's rows in one padded buffer, so scoring each row against every key of
the longest row costs rows x longest. glm-mlx scores contiguous rows of like lengths over their own
longest row (`BatchLayerCache.buckets`) once the padding would cost BUCKET_MIN_MACS. This times one
layer's batched top-k selection (`Indexer.batch_topk`, GLM-5.1's indexer shapes: 32 heads x 128,
top-k 2048, float32 keys, random weights) for one long conversation decoding beside short ones, with
the ranges and with every row over the whole buffer (the split disabled), and prints the ratio.
Linux: OpenBLAS is preloaded, as the other scripts do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from glm_mlx.batch import cache as batch_cache
from glm_mlx.model.attention import Indexer  # noqa: E402
from glm_mlx.batch.cache import BatchLayerCache  # noqa: E402
from glm_mlx.model.config import ModelArgs  # noqa: E402
from machine import describe  # noqa: E402  (benchmarks/machine.py: the BLAS/backend line)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long", type=int, default=100_000)
    p.add_argument("--short", type=int, default=1000)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    import reference_ops

    reference_ops.ensure_fast_blas()  # Linux: re-executes with OpenBLAS preloaded
    print(describe(), flush=True)  # after the re-exec, so the BLAS is the one measured with

    args = ModelArgs.from_dict(json.loads((ROOT / "glm_mlx" / "data" / "glm-5.1-config.json").read_text()))
    index = Indexer(args)
    mx.eval(index.parameters())
    h, D = args.index_n_heads, args.index_head_dim
    lengths = [a.long] + [a.short] * (a.rows - 1)  # longest first, as a decode group keeps its rows
    cap = -(-(a.long + 1) // 256) * 256
    keys = mx.random.normal((a.rows, 1, cap, D))
    layer = BatchLayerCache(True, None, [mx.zeros((a.rows, 1, cap, 1))], [keys], lengths, args.kv_lora_rank)
    layer._capacity = cap
    x = mx.random.normal((a.rows, 1, args.hidden_size))
    qr = mx.random.normal((a.rows, 1, args.q_lora_rank))
    offsets = mx.array(lengths, dtype=mx.int32)
    mx.eval(keys, x, qr)

    def run() -> float:
        layer.lengths = list(lengths)  # batch_topk writes this step's key and counts it
        layer._pos = offsets
        layer.index = [keys]
        valid = layer.valid(1)
        start = time.perf_counter()
        mx.eval(index.batch_topk(x, qr, offsets, layer, valid))
        return time.perf_counter() - start

    times = {}
    for name, threshold in (("ranges", batch_cache.BUCKET_MIN_MACS), ("padded", 1 << 62)):
        batch_cache.BUCKET_MIN_MACS = threshold
        run()
        times[name] = min(run() for _ in range(a.repeat))
        print(f"{name}: {times[name] * 1000:.1f} ms per layer and step ({layer.buckets(h * D, args.index_topk)})",
              file=sys.stderr)
    print(f"| rows | lengths | ranges | padded | speed-up |\n|---|---|---|---|---|\n"
          f"| {a.rows} | 1 x {a.long:,} + {a.rows - 1} x {a.short:,} | {times['ranges'] * 1000:.1f} ms | "
          f"{times['padded'] * 1000:.1f} ms | {times['padded'] / times['ranges']:.2f}x |")


if __name__ == "__main__":
    main()
