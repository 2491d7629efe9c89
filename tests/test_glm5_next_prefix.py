"""The block prefix cache with GLM-5.3-Flash (glm5_next): each block keeps its KDA layers' states (conv
and recurrent) where a restore of the blocks up to it ends, beside its DSA layers' rows, so a RAM hit,
a disk hit and a restart resume exactly (logits <= 1e-4 of a cold prefill, greedy output equal)."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest
from glm5_next_reference import make_reference
from safetensors import safe_open
from test_glm5_next_parity import _add_mtp

from glm_mlx import load_model
from glm_mlx.generation.engine import Engine, StepStats, catch_up_mtp
from glm_mlx.prefix.block_file import CHECKSUM_KEY, _read_header
from glm_mlx.prefix.cache import PrefixCache

B = 16
RNG = np.random.RandomState(3)
BASE = [int(t) for t in RNG.randint(3, 96, size=53)]  # 3 blocks + 5; 26 pools of 2 > K = 4: the indexer selects
MORE = [int(t) for t in RNG.randint(3, 96, size=12)]
ATOL = 1e-4
DIFFS = {}
LOG = []


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm5_next_prefix")
    _add_mtp(path, make_reference(path, seed=7), seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(path, dtype=mx.float32)


def store(model, tmp_path, memory=1 << 30, mtp=True):
    return PrefixCache(model, identity="flash", block_size=B, mtp=mtp, memory_bytes=memory, disk_dir=tmp_path,
                       disk_bytes=1 << 30, log=LOG.append)


def prefilled(model, prompt, mtp=True, pc=None, prefix=None, step=2048):
    eng = Engine(model, mtp=mtp, prefill_step=step)
    pc = pc if pc is not None else eng.new_cache()
    if prefix is not None:
        prefix.track(pc)
    logits = eng.prefill(pc, prompt, StepStats())
    return pc, np.array(logits)


def check_hit(model, ps, prompt, name, disk_tokens=None, mtp=True):
    pc, st = ps.restore(prompt)
    assert st["blocks"] == 3 and pc.tokens == prompt[: 3 * B - 1]
    if disk_tokens is not None:
        assert st["disk_tokens"] == disk_tokens
    _, warm = prefilled(model, prompt, mtp, pc)
    _, cold = prefilled(model, prompt, mtp)
    DIFFS[name] = float(np.abs(warm - cold).max())
    assert DIFFS[name] <= ATOL
    again, _ = ps.restore(prompt)
    got = list(Engine(model, mtp=mtp, num_draft=2).generate(prompt, pc=again, max_tokens=10))
    assert got == list(Engine(model, mtp=False).generate(prompt, max_tokens=10))


@pytest.mark.parametrize("step", [2048, 7])
def test_ram_disk_and_restart_hits_are_exact(model, tmp_path, step):
    """step 2048: one chunked-KDA prefill, its recurrence split at the block ends; 7: chunks across them."""
    ps = store(model, tmp_path)
    pc, _ = prefilled(model, BASE, prefix=ps, step=step)
    kda = [c for c in pc.cache if c.block_layout == "boundary"]
    assert kda and all(sorted(c.marks) == [B - 1, 2 * B - 1, 3 * B - 1] for c in kda)
    assert ps.save(pc) == 3
    assert all(not c.marks for c in kda)  # stored: their memory goes
    check_hit(model, ps, BASE + MORE, f"ram/{step}", disk_tokens=0)
    ps.close()
    again = store(model, tmp_path)  # a restart over the same folder
    check_hit(model, again, BASE + MORE, f"restart/{step}", disk_tokens=3 * B)
    again.close()
    spill = store(model, tmp_path / "spill", memory=0)  # every block spills to disk at once
    pc, _ = prefilled(model, BASE, prefix=spill, step=step)
    spill.save(pc)
    spill.flush()
    assert spill.stats()["ram_blocks"] == 0
    check_hit(model, spill, BASE + MORE, f"disk/{step}", disk_tokens=3 * B)
    spill.close()
    print("max |logits - cold| after hits:", DIFFS)


def test_decoded_blocks_and_no_mtp(model, tmp_path):
    """Blocks completed while decoding keep their states too (one token per step, and MTP verification
    passes that roll back); without MTP the same holds."""
    for mtp in (True, False):
        ps = store(model, tmp_path / str(mtp), mtp=mtp)
        eng = Engine(model, mtp=mtp, num_draft=3)
        pc = eng.new_cache()
        ps.track(pc)
        prompt = BASE[:20]
        out = list(eng.generate(prompt, pc=pc, max_tokens=30))
        catch_up_mtp(model, pc)
        assert ps.save(pc) == len(pc.tokens) // B == 3
        check_hit(model, ps, prompt + out + MORE, f"decoded/mtp={mtp}", mtp=mtp)
        ps.close()


def test_block_files_carry_the_states_under_the_checksum(model, tmp_path):
    ps = store(model, tmp_path)
    pc, _ = prefilled(model, BASE, prefix=ps)
    ps.save(pc)
    ps.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 3
    with safe_open(str(files[0]), framework="numpy") as f:
        names, meta = set(f.keys()), f.metadata()
        conv, rec = f.get_tensor("layer.0.conv"), f.get_tensor("layer.0.recurrent")
    a = model.args
    assert conv.shape == (1, a.linear_conv_kernel_dim - 1, 3 * a.linear_num_heads * a.linear_head_dim)
    assert rec.shape == (1, a.linear_num_heads, a.linear_head_dim, a.linear_head_dim) and CHECKSUM_KEY in meta
    assert {"layer.3.0", "layer.3.2", "mtp.0"} <= names and "layer.3.conv" not in names
    # A flipped byte in a KDA state: the block is not served (its prefix is recomputed).
    damaged = max(files, key=lambda p: int(_read_header(p)[0]["depth"]))
    _, tensors, _ = _read_header(damaged)
    n = int.from_bytes(damaged.read_bytes()[:8], "little")
    at = 8 + n + tensors["layer.1.recurrent"]["data_offsets"][0] + 5
    data = bytearray(damaged.read_bytes())
    data[at] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again = store(model, tmp_path)
    pc, st = again.restore(BASE + MORE)
    assert st["blocks"] == 2 and not damaged.exists()
    again.close()
