"""The block prefix cache with GLM-5.3-Flash (glm5_next): blocks keep their KDA layers' states (conv and
recurrent) where a restore of the blocks up to them ends, beside their DSA layers' rows, so a RAM hit, a
disk hit and a restart resume exactly (logits <= 1e-4 of a cold prefill, greedy output equal). With
state_every=1 every block carries them; with state_every=2 (the tests at the end) every second block and a
saved prompt's last one do, a hit ends at the deepest that does, and the prompt cache holds no more states
than those blocks will carry."""

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
from glm_mlx.model.glm5_next_cache import LOOSE_MARKS
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


def store(model, tmp_path, memory=1 << 30, mtp=True, state_every=1):
    return PrefixCache(model, identity="flash", block_size=B, mtp=mtp, memory_bytes=memory, disk_dir=tmp_path,
                       disk_bytes=1 << 30, log=LOG.append, state_every=state_every)


def prefilled(model, prompt, mtp=True, pc=None, prefix=None, step=2048):
    eng = Engine(model, mtp=mtp, prefill_step=step)
    pc = pc if pc is not None else eng.new_cache()
    if prefix is not None:
        prefix.track(pc, prompt)
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


# --- sparse states: state_every=2 ----------------------------------------------------------------------
LONG = [int(t) for t in RNG.randint(3, 96, size=5 * B + 5)]  # 5 blocks + 5: states at blocks 1, 3 and 4 (last)


def kda_of(pc):
    return [c for c in pc.cache if c.block_layout == "boundary"]


def carriers(ps, prompt):
    """Which of prompt's full blocks the prefix cache holds with states (None: not held)."""
    out = []
    for key in ps._keys(prompt, len(prompt) // B):
        b = ps._mem.get(key) or ps._disk.get(key)
        out.append(None if b is None else b.state)
    return out


def exact_hit(model, ps, prompt, blocks, name, disk_tokens=None):
    assert ps.lookup(prompt) == blocks * B
    pc, st = ps.restore(prompt)
    assert st["blocks"] == blocks and st["tokens"] == blocks * B - 1 and pc.tokens == prompt[: blocks * B - 1]
    if disk_tokens is not None:
        assert st["disk_tokens"] == disk_tokens
    _, warm = prefilled(model, prompt, pc=pc)
    _, cold = prefilled(model, prompt)
    DIFFS[name] = float(np.abs(warm - cold).max())
    assert DIFFS[name] <= ATOL


def block_rows(a) -> int:
    """Bytes of a block's rows (float32): latent + indexer key|gate, per DSA layer and the MTP layer."""
    dsa = sum(a.is_indexed(i) for i in range(a.num_hidden_layers)) + 1
    assert all(a.has_indexer(i) for i in range(a.num_hidden_layers) if a.is_indexed(i))
    return B * dsa * (a.kv_lora_rank + 2 * a.index_head_dim) * 4


def test_default_state_every_from_the_model(model, tmp_path):
    """Default: the fewest blocks whose rows weigh one state (tiny model, float32: 19200 B of KDA state,
    16 * 768 B of rows a block with MTP -> 2)."""
    ps = PrefixCache(model, identity="flash", block_size=B, mtp=True, memory_bytes=1 << 30)
    a = model.args
    assert ps.state_every == -(-a.kda_state_bytes(4) // block_rows(a)) == 2 and ps.stats()["state_every"] == 2
    ps.close()


def test_sparse_states_hits_end_at_a_state_and_are_exact(model, tmp_path):
    ps = store(model, tmp_path, state_every=2)
    pc, _ = prefilled(model, LONG, prefix=ps, step=24)  # chunks across block ends
    assert all(sorted(c.marks) == [2 * B - 1, 4 * B - 1, 5 * B - 1] for c in kda_of(pc))  # sparse + the prompt's last
    assert ps.save(pc) == 5 and carriers(ps, LONG) == [False, True, False, True, True]
    assert all(not c.marks for c in kda_of(pc))
    # RAM accounting: exact; a block without state holds its rows only, one with them 1 KDA state more
    blocks = [ps._mem[k] for k in ps._keys(LONG, 5)]
    assert ps.ram_bytes == sum(b.nbytes for b in blocks)
    assert all(a.base is None for b in blocks for a in b.arrays.values())  # own bytes: no view pinning a buffer
    a = model.args
    assert blocks[2].nbytes == block_rows(a) and blocks[1].nbytes == block_rows(a) + a.kda_state_bytes(4)
    for name, prompt, k in [("whole", LONG + MORE, 5),  # ends at the prompt's last block
                            ("in block 4", LONG[:70] + MORE, 4),  # blocks 0-3 match: block 3 carries
                            ("in block 3", LONG[:55] + MORE, 2)]:  # blocks 0-2 match: block 1 does
        exact_hit(model, ps, prompt, k, f"sparse ram/{name}", disk_tokens=0)
    ps.close()
    again = store(model, tmp_path, state_every=2)  # a restart: the flags come from the files' headers
    assert carriers(again, LONG) == [False, True, False, True, True]
    exact_hit(model, again, LONG[:55] + MORE, 2, "sparse restart", disk_tokens=2 * B)
    exact_hit(model, again, LONG + MORE, 5, "sparse restart/whole")
    again.close()
    spill = store(model, tmp_path / "spill", memory=0, state_every=2)
    pc, _ = prefilled(model, LONG, prefix=spill)
    spill.save(pc)
    spill.flush()
    exact_hit(model, spill, LONG[:70] + MORE, 4, "sparse disk", disk_tokens=4 * B)
    spill.close()
    print("max |logits - cold| after hits:", DIFFS)


def test_prefill_keeps_only_the_states_blocks_will_carry(model, tmp_path):
    """A long prefill (21 blocks + 3, in chunks of 24 tokens) holds at most N // (state_every * B) + 1
    states per KDA layer at any time, state_every=1 one per block."""
    prompt = [int(t) for t in RNG.randint(3, 96, size=21 * B + 3)]
    for every, expect in [(2, 11), (1, 21)]:
        ps = store(model, tmp_path / str(every), state_every=every)
        eng = Engine(model, mtp=True, prefill_step=24)
        pc = eng.new_cache()
        ps.track(pc, prompt)
        held = []
        chunks = eng.prefill_chunks(pc, prompt, StepStats())
        for _ in chunks:
            held.append(max(len(c.marks) for c in kda_of(pc)))
        held.append(max(len(c.marks) for c in kda_of(pc)))
        assert max(held) == held[-1] == expect <= len(prompt) // (every * B) + 1
        catch_up_mtp(model, pc)
        assert ps.save(pc) == 21 and sum(carriers(ps, prompt)) == expect
        ps.close()


def test_decoding_keeps_a_bounded_number_of_states(model, tmp_path):
    """Blocks completed while decoding (MTP verification passes that roll back): the sparse ones, the
    prompt's last and the LOOSE_MARKS latest are held; the reply's last full block carries a state, so the
    next turn resumes at its end."""
    ps = store(model, tmp_path, state_every=2)
    eng = Engine(model, mtp=True, num_draft=3)
    pc = eng.new_cache()
    prompt = LONG[:20]
    ps.track(pc, prompt)
    out = []
    for tok in eng.generate(prompt, pc=pc, max_tokens=90):
        out.append(tok)
        for c in kda_of(pc):
            loose = [m for m in c.marks if not c.kept_point(m) and m != c.pin]
            assert len(loose) <= LOOSE_MARKS and len(c.marks) <= (c.offset + 1) // (2 * B) + 1 + LOOSE_MARKS  # (+1: the pin)
    catch_up_mtp(model, pc)
    n = len(pc.tokens) // B
    assert ps.save(pc) == n and carriers(ps, pc.tokens)[-1] is True
    assert carriers(ps, pc.tokens) == [(j + 1) % 2 == 0 or j == n - 1 for j in range(n)]
    exact_hit(model, ps, prompt + out + MORE, n, "sparse decoded")
    ps.close()
