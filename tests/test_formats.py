"""The format-to-bytes table against what `mx.quantize` really stores."""

from __future__ import annotations

import mlx.core as mx
import pytest

from glm_mlx.quantize.formats import Format, FormatError, all_formats, from_mlx, make_format, parse_format

# 2-D, 3-D stacked experts, a single row, and a last dim that only some groups divide (192).
SHAPES = [(8, 256), (3, 4, 384), (1, 128), (2, 5, 192)]


def _mlx_quantize(shape, fmt: Format, dtype=mx.bfloat16):
    w = mx.random.normal(shape).astype(dtype)
    return mx.quantize(w, group_size=fmt.group_size, bits=fmt.bits, mode=fmt.mode)


@pytest.mark.parametrize("fmt", all_formats(), ids=lambda f: f.name)
def test_nbytes_match_mx_quantize(fmt):
    for shape in SHAPES:
        if not fmt.fits(shape):
            with pytest.raises(FormatError):
                fmt.nbytes(shape)
            with pytest.raises(Exception):  # MLX refuses the same shapes
                mx.eval(*_mlx_quantize(shape, fmt))
            continue
        arrays = _mlx_quantize(shape, fmt)
        assert fmt.nbytes(shape) == sum(a.nbytes for a in arrays), (fmt.name, shape)
        # the per-array breakdown a converter test will check tensor by tensor
        expected = fmt.arrays(shape)
        names = ["weight", "scales", "biases"][: len(arrays)]
        assert list(expected) == names
        for name, a in zip(names, arrays):
            assert tuple(a.shape) == expected[name][0] and a.dtype.size == expected[name][1]


def test_affine_scales_follow_the_weight_dtype():
    fmt = parse_format("affine4g64")
    arrays = _mlx_quantize((4, 128), fmt, dtype=mx.float32)
    assert fmt.nbytes((4, 128), dtype_bytes=4) == sum(a.nbytes for a in arrays)


def test_bits_per_weight_match_the_reference_notes():
    bpw = {name: parse_format(name).bits_per_weight() for name in ("affine4g64", "mxfp4", "nvfp4", "mxfp8", "bf16")}
    assert bpw == {"affine4g64": 4.5, "mxfp4": 4.25, "nvfp4": 4.5, "mxfp8": 8.25, "bf16": 16.0}


def test_unquantized_sizes():
    assert parse_format("bf16").nbytes((3, 5)) == 30
    assert parse_format("float32").nbytes((3, 5)) == 60
    assert not parse_format("f16").quantized and parse_format("f16").to_mlx() is False


@pytest.mark.parametrize("name,expected", [
    ("affine4g64", ("affine", 4, 64)), ("affine4", ("affine", 4, 64)), ("AFFINE3G32", ("affine", 3, 32)),
    ("q8g128", ("affine", 8, 128)), ("mxfp4", ("mxfp4", 4, 32)), ("nvfp4", ("nvfp4", 4, 16)),
    ("mxfp8", ("mxfp8", 8, 32)), ("mxfp4g32", ("mxfp4", 4, 32)), ("bfloat16", ("bf16", 16, None)),
])
def test_parse_format(name, expected):
    f = parse_format(name)
    assert (f.mode, f.bits, f.group_size) == expected
    assert parse_format(f.name) == f


@pytest.mark.parametrize("bad", ["affine7", "affine4g48", "mxfp4g64", "int4", ""])
def test_parse_format_rejects(bad):
    with pytest.raises(FormatError):
        parse_format(bad)


def test_mlx_lm_quantization_dict_round_trip():
    for f in all_formats():
        assert from_mlx(f.to_mlx()) == f
    assert from_mlx(False) is None
    assert from_mlx({"bits": 4}) == parse_format("affine4g64")  # mlx-lm defaults: affine, group 64
    assert make_format("mxfp4") == parse_format("mxfp4")
    with pytest.raises(FormatError):
        make_format("nvfp4", bits=8)
    with pytest.raises(FormatError):
        from_mlx({"group_size": 64})
