"""Block prefix cache (glm_mlx.prefix.cache): RAM and disk hits are exact, restarts keep them."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from glm_mlx import load_model
from glm_mlx.generation.engine import Engine, StepStats
from glm_mlx.prefix.cache import PrefixCache, default_cache_dir

B = 16
RNG = np.random.RandomState(1)
BASE = [int(t) for t in RNG.randint(11, 80, size=53)]  # > index_topk (8); 3 blocks + 5
MORE = [int(t) for t in RNG.randint(11, 80, size=12)]


@pytest.fixture(scope="module")
def model(mtp_ckpt):
    m = load_model(mtp_ckpt, dtype=mx.float32)
    assert len(BASE) > m.args.index_topk and m.has_mtp
    return m


def store(model, tmp_path=None, *, mtp=True, identity="tiny", memory=1 << 30, disk=1 << 30, log=None, **kw):
    return PrefixCache(model, identity=identity, block_size=B, mtp=mtp, memory_bytes=memory,
                       disk_dir=tmp_path, disk_bytes=disk if tmp_path is not None else 0,
                       log=log if log is not None else (lambda msg: None), **kw)


def prefilled(model, prompt, mtp, pc=None):
    eng = Engine(model, mtp=mtp)
    pc = pc if pc is not None else eng.new_cache()
    logits = eng.prefill(pc, prompt, StepStats())
    return pc, np.array(logits)


def states(pc):
    return [[np.array(a) for a in c.state] for c in pc.all_caches()]


def check_hit(model, ps, prompt, mtp, *, ram=None, disk=None, gen=0):
    """Restore + prefill the rest == a cold prefill: logits, every cache (MTP included), generation."""
    want = ps.lookup(prompt)
    assert want > 0 and want % B == 0 and want <= len(prompt)
    if ram is not None:
        assert want == ram + disk
    pc, st = ps.restore(prompt)
    assert st["blocks"] * B == want and len(pc.tokens) == st["tokens"] == want - 1
    assert pc.tokens == prompt[: want - 1] and pc.pending is None
    if mtp:
        assert pc.mtp_cache.offset == len(pc.tokens)
    if ram is not None:
        assert (st["ram_tokens"], st["disk_tokens"]) == (ram, disk)
    warm, warm_logits = prefilled(model, prompt, mtp, pc)
    cold, cold_logits = prefilled(model, prompt, mtp)
    np.testing.assert_allclose(warm_logits, cold_logits, atol=1e-4, rtol=1e-4)
    assert warm.tokens == cold.tokens
    for w, c in zip(states(warm), states(cold)):
        assert len(w) == len(c)
        for a, b in zip(w, c):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    if mtp:
        assert warm.mtp_cache.offset == cold.mtp_cache.offset == len(prompt) - 1
        np.testing.assert_allclose(np.array(warm.pending), np.array(cold.pending), atol=1e-4)
    if gen:  # greedy generation continues token for token (with MTP drafting when on)
        pc2, _ = ps.restore(prompt)
        got = list(Engine(model, mtp=mtp, num_draft=2).generate(prompt, pc2, max_tokens=gen))
        assert got == list(Engine(model, mtp=mtp, num_draft=2).generate(prompt, max_tokens=gen))
    return st


@pytest.mark.parametrize("mtp", [True, False])
def test_ram_hit_is_exact(model, mtp):
    ps = store(model, mtp=mtp)
    pc, _ = prefilled(model, BASE, mtp)
    assert ps.save(pc) == 3 and ps.save(pc) == 0  # 53 tokens: 3 complete blocks, stored once
    assert ps.ram_bytes > 0 and ps.disk_bytes_used() == 0
    check_hit(model, ps, BASE + MORE, mtp, ram=48, disk=0, gen=12)
    # k blocks are usable iff k*B <= len(prompt): one prompt token always remains to process
    assert ps.lookup(BASE[:48]) == 48 and ps.lookup(BASE[:47]) == 32 and ps.lookup(BASE[:15]) == 0
    check_hit(model, ps, BASE[:48], mtp)
    none, st = ps.restore(BASE[:15])
    assert none is None and st["blocks"] == st["tokens"] == 0
    assert ps.lookup([1] + BASE[1:]) == 0  # the chain hashes every token from the first
    with pytest.raises(ValueError):  # an MTP store never takes a cache without MTP, and vice versa
        ps.save(prefilled(model, BASE, not mtp)[0])
    ps.close()


def test_multi_turn_adds_blocks_past_the_restored_ones(model):
    """Turn 2 restores turn 1's blocks, decodes with MTP, and saves only its new blocks (sliced from
    positions past 0, MTP slots from s-1); turn 3 hits all of them exactly."""
    ps = store(model)
    ps.save(prefilled(model, BASE, True)[0])
    prompt2 = BASE + MORE
    pc, st = ps.restore(prompt2)
    assert st["blocks"] == 3
    reply = list(Engine(model, mtp=True, num_draft=2).generate(prompt2, pc, max_tokens=30))
    n = len(pc.tokens)
    assert ps.save(pc) == n // B - 3 >= 2
    st = check_hit(model, ps, (prompt2 + reply)[: n // B * B + 3], True, gen=6)
    assert st["blocks"] == n // B


def test_prefix_of_prompt_plus_reply_hits(model):
    """Blocks written by one conversation's prompt + reply serve another prompt that is a prefix of it."""
    ps = store(model)
    eng = Engine(model, mtp=True, num_draft=2)
    pc = eng.new_cache()
    reply = list(eng.generate(BASE, pc, max_tokens=30))
    assert len(pc.tokens) >= 80 and ps.save(pc) == len(pc.tokens) // B  # the reply's blocks too
    prompt = (BASE + reply)[:75]  # ends inside the reply
    st = check_hit(model, ps, prompt, True, gen=8)
    assert st["blocks"] == 4 > len(BASE) // B


def test_disk_hit_restart_and_identity(model, tmp_path):
    logs = []
    ps = store(model, tmp_path, memory=1, log=logs.append)  # everything spills
    pc, _ = prefilled(model, BASE + MORE, True)
    assert ps.save(pc) == 4
    ps.flush()
    assert ps.ram_bytes == 0 and len(list(tmp_path.glob("*.safetensors"))) == 4
    assert ps.disk_bytes_used() == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    check_hit(model, ps, BASE + MORE, True, ram=0, disk=64)
    ps.close()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    # a restart: the index is rebuilt from the files' headers
    again = store(model, tmp_path, log=logs.append)
    assert again.stats()["disk_blocks"] == 4
    check_hit(model, again, BASE + MORE[:3], True, ram=0, disk=48, gen=10)
    assert again.stats()["ram_blocks"] == 3  # read back and promoted
    check_hit(model, again, BASE, True, ram=48, disk=0)
    again.close()
    assert logs == []

    # another identity, or the same model without MTP, misses (and leaves the files alone)
    for other in (store(model, tmp_path, identity="other", log=logs.append), store(model, tmp_path, mtp=False, log=logs.append)):
        assert other.lookup(BASE + MORE) == 0 and other.restore(BASE + MORE)[0] is None
        other.close(persist=False)
    assert len(logs) == 2 and all("4 file(s) of other models" in m for m in logs)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_close_persists_ram_blocks(model, tmp_path):
    ps = store(model, tmp_path)  # all fits in RAM: nothing is written until close
    pc, _ = prefilled(model, BASE, True)
    ps.save(pc)
    ps.flush()
    assert ps.disk_bytes_used() == 0
    ps.close()
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    again = store(model, tmp_path)
    assert again.lookup(BASE) == 48
    again.close()


def _meta(p):
    from glm_mlx.prefix.store import _read_header

    try:
        return _read_header(p)[0]
    except Exception:  # noqa: BLE001
        return {}


def _by_depth(d, identity="tiny") -> dict:
    return {int(m["depth"]): p for p in d.glob("*.safetensors")
            if f"identity={identity}\n" in (m := _meta(p)).get("identity", "")}


def test_corrupt_and_foreign_files_are_ignored(model, tmp_path):
    foreign = store(model, tmp_path, identity="someone-else", memory=0)
    foreign.save(prefilled(model, BASE, True)[0])
    foreign.close()
    ours = store(model, tmp_path, memory=0)
    ours.save(prefilled(model, BASE + MORE, True)[0])
    ours.close()
    theirs, mine = _by_depth(tmp_path, "someone-else"), _by_depth(tmp_path)
    assert len(theirs) == 3 and len(mine) == 4
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    mine[3].write_bytes(mine[3].read_bytes()[:-100])  # ours (its header says so), cut short: removed

    logs = []
    ps = store(model, tmp_path, memory=0, log=logs.append)
    assert all("\n" not in m for m in logs) and len(logs) == 4
    assert any("garbage.safetensors" in m and "ignoring" in m for m in logs)
    assert any("empty.safetensors" in m and "ignoring" in m for m in logs)
    assert any(mine[3].name in m and "removing" in m for m in logs)
    assert any("3 file(s) of other models" in m for m in logs)
    assert (tmp_path / "garbage.safetensors").exists() and (tmp_path / "empty.safetensors").exists()
    assert all(p.exists() for p in theirs.values()) and not mine[3].exists()
    check_hit(model, ps, BASE + MORE, True, ram=0, disk=48)  # the first three blocks still serve
    ps.close()

    # a file that goes bad after the index was built: the chain stops there
    logs.clear()
    ps = store(model, tmp_path, memory=0, log=logs.append)
    mine[1].write_bytes(b"broken")
    pc, st = ps.restore(BASE + MORE)
    assert st["blocks"] == 1 and len(pc.tokens) == B - 1
    assert any("cannot read" in m for m in logs) and ps.lookup(BASE + MORE) == B
    ps.close()


def test_disk_budget_evicts_deepest_first(model, tmp_path):
    probe = store(model, tmp_path / "probe", memory=0)
    probe.save(prefilled(model, BASE + MORE, True)[0])
    probe.flush()
    sizes = sorted(p.stat().st_size for p in (tmp_path / "probe").glob("*.safetensors"))
    probe.close()
    budget = sizes[-1] * 2 + sizes[0] // 2  # room for two blocks
    ps = store(model, tmp_path / "d", memory=0, disk=budget)
    ps.save(prefilled(model, BASE + MORE, True)[0])  # 4 blocks spill, deepest first
    ps.flush()
    assert ps.disk_bytes_used() <= budget and len(list((tmp_path / "d").glob("*.safetensors"))) == 2
    assert ps.lookup(BASE + MORE) == 32  # the head of the chain survives, not an orphaned tail
    check_hit(model, ps, BASE + MORE, True, ram=0, disk=32)
    ps.close()
    # a restart with a smaller budget trims the directory to it
    small = store(model, tmp_path / "d", memory=0, disk=sizes[-1] + 10)
    assert small.disk_bytes_used() <= sizes[-1] + 10 and small.lookup(BASE + MORE) == 16
    small.close()


def test_ram_bound_without_disk_drops_tails(model):
    probe = store(model)
    probe.save(prefilled(model, BASE, True)[0])
    per_block = probe.ram_bytes // 3
    ps = store(model, memory=per_block * 2 + 1)
    ps.save(prefilled(model, BASE + MORE, True)[0])
    assert ps.ram_bytes <= per_block * 2 + 1 and ps.lookup(BASE + MORE) == 32


def test_partial_prefill_is_saved(model):
    """A cancelled prefill keeps its completed chunks; their complete blocks are saved and exact."""
    eng = Engine(model, mtp=True, prefill_step=20)
    pc = eng.new_cache()
    chunks = eng.prefill_chunks(pc, BASE + MORE, StepStats())
    next(chunks), next(chunks)
    chunks.close()  # stops before the third chunk, as the server's scheduler cancels a request
    assert len(pc.tokens) == 40 and pc.mtp_cache.offset == 39
    ps = store(model)
    assert ps.save(pc) == 2
    check_hit(model, ps, BASE + MORE, True, ram=32, disk=0)


def test_index_cache_8bit_and_bfloat16_round_trip(model, tmp_path):
    """Packed 8-bit indexer keys and bfloat16 arrays come back bit for bit from disk."""
    model.set_index_cache_bits(8)
    try:
        ps = store(model, tmp_path / "q8", memory=0)
        pc, _ = prefilled(model, BASE, True)
        assert any(len(c.state) == 3 and c.state[2].dtype == mx.uint32 for c in pc.cache)  # packed keys
        ps.save(pc)
        ps.flush()
        check_hit(model, ps, BASE + MORE, True, ram=0, disk=48)
        ps.close()
    finally:
        model.set_index_cache_bits(None)
    # bfloat16 (numpy has none: stored as its uint16 bits): cache arrays cast from a float32 prefill
    # (MLX's CPU backend cannot run a bfloat16 MoE). Block 0 from a short prompt, blocks 1-2 from the
    # long one, so rows are sliced from positions past 0 too.
    ps = store(model, tmp_path / "bf16", memory=0)
    pcs = []
    for prompt in (BASE[:20], BASE):
        pc, _ = prefilled(model, prompt, True)
        for c in pc.all_caches():
            c.state = [a.astype(mx.bfloat16) for a in c.state]
        pcs.append(pc)
        ps.save(pc)
    ps.flush()
    got, st = ps.restore(BASE)
    assert st["disk_tokens"] == 48
    for i, w in enumerate(got.all_caches()):
        assert w.offset == 47
        mtp = i == len(got.cache)  # MTP slot 15 pairs h_15 with token 16: block 1's
        for j, x in enumerate(w.state):
            head, tail = pcs[0].all_caches()[i].state[j], pcs[1].all_caches()[i].state[j]
            cut = B - 1 if mtp else B
            assert x.dtype == head.dtype == tail.dtype == mx.bfloat16
            assert mx.array_equal(x[..., :cut, :], head[..., :cut, :]).item()
            assert mx.array_equal(x[..., cut:, :], tail[..., cut:47, :]).item()
    ps.close()


def test_write_through_and_default_dir(model, tmp_path, monkeypatch):
    ps = store(model, tmp_path, write_through=True)
    ps.save(prefilled(model, BASE, True)[0])
    ps.flush()
    assert len(list(tmp_path.glob("*.safetensors"))) == 3 and ps.stats()["ram_blocks"] == 3
    ps.close(persist=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "glm-mlx" / "prefix"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(default_cache_dir()).endswith(os.path.join("glm-mlx", "prefix"))


# --- faults on disk (docs/reliability.md, "Prefix cache on disk") --------------------------------------

def _data_start(p) -> int:
    return 8 + int.from_bytes(p.read_bytes()[:8], "little")


def test_damaged_block_data_is_recomputed(model, tmp_path):
    """A block whose data bytes went bad (header intact, so the start-up check passes) is caught by its
    checksum when read back: one warning, the block and the chain after it are not served, the prefix
    is recomputed (logits, caches and greedy answer equal a cold run), and the chain heals when saved."""
    ps = store(model, tmp_path, memory=0)
    ps.save(prefilled(model, BASE + MORE, True)[0])
    ps.close()
    mine = _by_depth(tmp_path)
    assert len(mine) == 4 and all(len(_meta(p)["data_xxh3_128"]) == 32 for p in mine.values())
    raw = bytearray(mine[1].read_bytes())
    header = bytes(raw[: _data_start(mine[1])])
    at = (len(header) + len(raw)) // 2
    raw[at] ^= 0x10  # one bit of one array
    mine[1].write_bytes(bytes(raw))
    assert mine[1].read_bytes()[: len(header)] == header

    logs = []
    ps = store(model, tmp_path, memory=0, log=logs.append)
    assert logs == [] and ps.lookup(BASE + MORE) == 64  # headers only at start: it looks fine
    pc, st = ps.restore(BASE + MORE)
    assert st["blocks"] == 1 and len(pc.tokens) == B - 1
    assert len(logs) == 1 and "damaged" in logs[0] and mine[1].name in logs[0] and "\n" not in logs[0]
    assert not mine[1].exists()
    check_hit(model, ps, BASE + MORE, True, ram=0, disk=16, gen=8)  # the rest recomputed == cold
    assert len(logs) == 1
    ps.save(prefilled(model, BASE + MORE, True)[0])  # rewrites block 1: blocks 2-3 on disk serve again
    ps.flush()
    assert mine[1].exists() and ps.lookup(BASE + MORE) == 64
    ps.close()
    ps = store(model, tmp_path, memory=0, log=logs.append)
    check_hit(model, ps, BASE + MORE, True, ram=0, disk=64)
    ps.close()
    assert len(logs) == 1


def test_files_without_checksum_are_not_served(model, tmp_path):
    """glm-mlx-prefix/1 files (no checksum) count as another model's: left alone, never served. A /2
    file of ours without its checksum is corrupt: removed."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from glm_mlx.prefix.store import FORMAT

    assert FORMAT == "glm-mlx-prefix/2"
    ps = store(model, tmp_path, memory=0)
    ps.save(prefilled(model, BASE, True)[0])
    ps.close()
    mine = _by_depth(tmp_path)
    for depth, change in ((0, {"format": "glm-mlx-prefix/1"}), (1, {"data_xxh3_128": None})):
        with safe_open(str(mine[depth]), framework="numpy") as f:
            meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta.update(change)
        save_file(arrays, str(mine[depth]), metadata={k: v for k, v in meta.items() if v is not None})
    logs = []
    ps = store(model, tmp_path, memory=0, log=logs.append)
    assert len(logs) == 2 and any("1 file(s) of other models" in m for m in logs)
    assert any("removing corrupt" in m and "no data checksum" in m for m in logs)
    assert mine[0].exists() and not mine[1].exists() and ps.lookup(BASE) == 0
    ps.close()


def test_leftover_temp_files_are_removed_at_start(model, tmp_path):
    import subprocess
    import sys
    import time

    key = "ab" * 32
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a process that has exited
    live = os.getppid()
    names = {"dead": f".{key}.{dead}.tmp", "ours": f".{key}.{os.getpid()}.tmp", "live": f".{key}.{live}.tmp",
             "live_old": f".{'cd' * 32}.{live}.tmp", "lib": ".tmpAb12Cd", "lib_old": ".tmpXy34Zw",
             "other": ".notes.tmp"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"\x00" * 100)  # cut short: a header is no condition
    old = time.time() - 7200
    for k in ("live_old", "lib_old"):
        os.utime(tmp_path / names[k], (old, old))
    logs = []
    ps = store(model, tmp_path, log=logs.append)
    left = {k for k, n in names.items() if (tmp_path / n).exists()}
    assert left == {"live", "lib", "other"}  # a writer that may be writing, and not a name of ours
    assert logs == [] and ps.stats()["disk_blocks"] == 0 and ps.disk_bytes_used() == 0
    # our own pid's temp file while another store of this process has the directory open: a live write
    (tmp_path / names["ours"]).write_bytes(b"")
    second = store(model, tmp_path, log=logs.append)
    assert (tmp_path / names["ours"]).exists()
    second.close()
    ps.close()
    third = store(model, tmp_path, log=logs.append)
    assert not (tmp_path / names["ours"]).exists() and logs == []
    third.close()


def _usage(free, total=10**12):
    import shutil

    return shutil._ntuple_diskusage(total, total - free, free)


def test_disk_limit_is_capped_to_free_space(model, tmp_path, monkeypatch):
    import shutil

    ps = store(model, tmp_path, memory=0)
    ps.save(prefilled(model, BASE, True)[0])
    ps.close()
    used = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    keep = 10 * 10**9  # min(5% of 1 TB, 10 GB)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _usage(keep + 5000))
    logs = []
    ps = store(model, tmp_path, memory=0, disk=1 << 40, log=logs.append)
    assert ps.stats()["disk_limit"] == used + 5000 and ps.disk_bytes_used() == used
    assert len(logs) == 1 and "using" in logs[0] and "free" in logs[0]
    ps.save(prefilled(model, BASE + MORE, True)[0])  # a 4th block does not fit beside the 3: LRU goes
    ps.flush()
    assert ps.disk_bytes_used() <= used + 5000
    ps.close()
    # a limit that fits: no warning, unchanged
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _usage(10**12 // 2))
    logs.clear()
    ps = store(model, tmp_path, memory=0, disk=1 << 30, log=logs.append)
    assert logs == [] and ps.stats()["disk_limit"] == 1 << 30
    ps.close()


def test_full_disk_pauses_writes_with_one_warning(model, tmp_path, monkeypatch):
    import errno
    import shutil
    import time

    from glm_mlx.prefix import store as prefix_store

    real, state = prefix_store._write_file, {"full": False, "tries": 0}

    def write(path, data):
        state["tries"] += 1
        if state["full"]:
            with open(path, "wb") as f:
                f.write(data[:100])  # a partial temp file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(prefix_store, "_write_file", write)
    monkeypatch.setattr(prefix_store, "_FULL_RETRY_S", 0.3)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _usage(10**12 // 2 if not state["full"] else 1000))
    logs = []
    ps = store(model, tmp_path, memory=0, log=logs.append)
    state["full"] = True  # (after the start-up check of the limit against the free space)
    ps.save(prefilled(model, BASE + MORE, True)[0])  # 4 blocks spill: the 1st write fails, 3 skipped
    ps.flush()
    st = ps.stats()
    assert state["tries"] == 1 and st["disk_full"] and st["write_errors"] == 1 and st["disk_full_skipped"] == 3
    assert len(logs) == 1 and "is full" in logs[0] and "paused" in logs[0]
    assert list(tmp_path.iterdir()) == [] and ps.lookup(BASE + MORE) == 0  # no temp file left behind
    time.sleep(0.35)  # retry due, but the disk still says it has no room: skipped without a try
    ps.save(prefilled(model, BASE, True)[0])
    ps.flush()
    assert state["tries"] == 1 and len(logs) == 1 and ps.stats()["disk_full_skipped"] == 6
    state["full"] = False  # room again
    time.sleep(0.35)
    ps.save(prefilled(model, BASE + MORE, True)[0])
    ps.flush()
    st = ps.stats()
    assert not st["disk_full"] and st["disk_blocks"] == 4 and state["tries"] == 5
    assert len(logs) == 2 and "room again" in logs[1]
    check_hit(model, ps, BASE + MORE, True, ram=0, disk=64)
    ps.close()
