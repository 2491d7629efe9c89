"""Run under `mlx.launch --backend ring -n 2`: pipeline generation; each rank writes a JSON result.

Rank 0 leads (runs the engine, samples); rank 1 follows (replays rank 0's requests).
"""

import json
import os
import sys

import mlx.core as mx

from glm_mlx.distributed.pipeline import follow, pipeline_load
from glm_mlx.generation.engine import Engine, StepStats

path, out, n_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
die_at = int(os.environ.get("GLM_TEST_DIE_AT", "-1"))
ranges = json.loads(os.environ["GLM_TEST_RANGES"]) if "GLM_TEST_RANGES" in os.environ else None
group = mx.distributed.init()
model, _ = pipeline_load(path, group, ranges=ranges, dtype=mx.float32)
prompt = json.loads(os.environ["GLM_TEST_PROMPT"])
result = {"rank": group.rank(), "resident_bytes": model.resident_bytes, "ranges": model.ranges}

if group.rank() != 0:
    if die_at >= 0:  # simulate a machine dying mid-generation: after `die_at` model calls
        calls, real = [0], type(model).__call__

        def dying(self, *a, **k):
            calls[0] += 1
            if calls[0] > die_at:
                os._exit(7)
            return real(self, *a, **k)

        type(model).__call__ = dying
    follow(model)
else:
    for mtp in (False, True):
        result[f"mtp={mtp}"] = list(Engine(model, mtp=mtp, num_draft=2).generate(prompt, max_tokens=n_tokens,
                                                                                  stats=StepStats()))
    model.close()
with open(f"{out}.{group.rank()}.json", "w") as f:
    json.dump(result, f)
