"""The memory guard warns before loading, with the exact fix, from files and config alone."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from glm_mlx import ModelArgs
from glm_mlx.memory import check_memory, set_wired_limit

GLM51 = ModelArgs.from_dict(json.loads((Path(__file__).parents[1] / "glm_mlx/data/glm-5.1-config.json").read_text()))
GB = 10**9


def fake_checkpoint(tmp_path, size):
    f = tmp_path / "model-00001.safetensors"
    with open(f, "wb") as fh:  # sparse file: size without disk use
        fh.truncate(size)
    return tmp_path


def test_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 480 * GB, "memory_size": 512 * GB})
    check = check_memory(fake_checkpoint(tmp_path, 360 * GB), GLM51, context=32768)
    assert check.fits and check.cache_bytes == GLM51.cache_bytes_per_token(2, mtp=True) * 32768


def test_too_big_says_the_sysctl(tmp_path, monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 380 * GB, "memory_size": 512 * GB})
    check = check_memory(fake_checkpoint(tmp_path, 360 * GB), GLM51, context=202752)
    assert not check.fits
    assert "sudo sysctl iogpu.wired_limit_mb=" in check.message
    mb = int(check.message.split("wired_limit_mb=")[1].split()[0])
    assert check.needed_bytes < mb * 2**20 < 512 * GB


def test_does_not_fit_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 100 * GB, "memory_size": 128 * GB})
    check = check_memory(fake_checkpoint(tmp_path, 360 * GB), GLM51, context=8192)
    assert not check.fits and "glm-mlx fit --solve" in check.message


def test_the_real_backend(tmp_path):
    """Unpatched: on the CPU backend there is no limit (nothing to warn about, nothing wired); on Metal
    the limit is the device's recommended working set and a 1 GB checkpoint fits under it."""
    check = check_memory(fake_checkpoint(tmp_path, GB), GLM51, context=1024)
    recommended = mx.device_info().get("max_recommended_working_set_size")
    assert check.limit_bytes == recommended
    assert check.fits
    assert set_wired_limit(check) == (recommended is not None and mx.metal.is_available())
