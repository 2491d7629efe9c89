"""Quantize one weight into the arrays MLX stores for it (what `mx.quantize` returns).

Two methods, both producing MLX's native layout, so `mx.dequantize`, `mx.quantized_matmul` and
`mx.gather_qmm` consume the result as they would `mx.quantize`'s:
  - "rtn": plain `mx.quantize` (round to nearest, MLX's own scale choice);
  - "iq": importance-weighted (the IQ4_XS idea on MLX formats). For every group of a row it
    picks the scale (and bias, for affine) that minimises sum_j imp_j * (w_j - w^_j)^2, where
    imp_j is the mean squared input activation of channel j (quantize/imatrix.py):
      affine: a scan of clipping ranges (llama.cpp's make_qkx2 scan: iscale = (n + d) / range,
              d = -1..+1 in 0.2 steps; 0.1 steps measured no better on MiniLM), each refined by the
              closed-form weighted least-squares (scale, bias) for its codes;
      mxfp4 / mxfp8: the shared power-of-two exponent, MLX's choice +-1;
      nvfp4: the e4m3 scale, over a grid of clipping factors plus a weighted least-squares step.
    Scales and biases are rounded to their stored precision before codes are chosen, and MLX's own
    choice is always a candidate, so "iq" never has a larger weighted error than "rtn" in any group.
"""

from __future__ import annotations

import mlx.core as mx

from .formats import Format

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes; the code is the index
_FP4_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
FP_MAX = {"mxfp4": 6.0, "nvfp4": 6.0, "mxfp8": 448.0}
FP_EMAX = {"mxfp4": 2, "mxfp8": 8}  # exponent of the largest element value (OCP MX spec)
AFFINE_STEPS = [d / 5 for d in range(-5, 6)]
NV_FACTORS = [0.70 + 0.03 * i for i in range(16)]  # nvfp4 clipping factors around amax / 6


def quantize(w: mx.array, fmt: Format, importance: mx.array | None = None, *, method: str = "rtn",
             dtype=mx.bfloat16) -> dict[str, mx.array]:
    """w [..., out, in] -> {"weight", "scales"[, "biases"]} as MLX stores `fmt`.

    importance: per input channel, broadcastable to w's shape ([in], or [E, 1, in] for stacked
    experts); None = uniform. `dtype` is the model dtype (affine scales and biases are stored in it).
    """
    if not fmt.quantized:
        return {"weight": w.astype(dtype)}
    w = w.astype(dtype)
    plain = mx.quantize(w, fmt.group_size, fmt.bits, mode=fmt.mode)
    if method == "rtn":
        return dict(zip(("weight", "scales", "biases"), plain))
    if method != "iq":
        raise ValueError(f"unknown quantization method {method!r} (rtn, iq)")
    shape, g = w.shape, fmt.group_size
    x = w.astype(mx.float32).reshape(*shape[:-1], shape[-1] // g, g)
    imp = mx.ones((shape[-1],)) if importance is None else importance.astype(mx.float32)
    imp = mx.broadcast_to(imp, (*imp.shape[:-1], shape[-1])).reshape(*imp.shape[:-1], shape[-1] // g, g)
    imp = imp + 1e-8 * mx.mean(imp) + 1e-30  # no channel weighs exactly nothing
    if fmt.mode == "affine":
        return _iq_affine(x, imp, fmt, plain, dtype)
    return _iq_fp(x, imp, fmt, plain)


# --- packing ---------------------------------------------------------------------------------------
def pack(codes: mx.array, bits: int) -> mx.array:
    """Codes [..., n] (< 2^bits) -> uint32 [..., n * bits / 32], packed from the lowest bit up
    (MLX's layout for every mode: 3/5/6-bit codes run across word boundaries)."""
    *lead, n = codes.shape
    c = codes.astype(mx.uint64).reshape(*lead, n // 32, 32)
    words = [mx.zeros(c.shape[:-1], mx.uint64) for _ in range(bits + 1)]
    for k in range(32):
        pos = bits * k
        words[pos // 32] = words[pos // 32] + (c[..., k] << (pos % 32))
    mask = mx.array(0xFFFFFFFF, mx.uint64)
    out = [(words[i] & mask) + (words[i - 1] >> 32 if i else 0) for i in range(bits)]
    return mx.stack(out, axis=-1).astype(mx.uint32).reshape(*lead, n * bits // 32)


# --- affine ------------------------------------------------------------------------------------------
def _wls(q, x, imp):
    """Closed-form (scale, bias) minimising sum imp * (scale * q + bias - x)^2 per group."""
    sw, sq, sx = imp.sum(-1), (imp * q).sum(-1), (imp * x).sum(-1)
    sqq, sqx = (imp * q * q).sum(-1), (imp * q * x).sum(-1)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * sw * sqq + 1e-30
    det = mx.where(ok, det, 1.0)
    return mx.where(ok, (sw * sqx - sq * sx) / det, 0.0), mx.where(ok, (sqq * sx - sq * sqx) / det, sx / sw), ok


def _affine_codes(x, s, b, n):
    safe = mx.where(s == 0, 1.0, s)
    return mx.where(s[..., None] == 0, 0.0, mx.clip(mx.round((x - b[..., None]) / safe[..., None]), 0, n))


def _affine_fns(n: int, dtype):
    """The steps of the affine search for n + 1 levels and the stored scale dtype. (mx.compile was
    tried: its CPU JIT costs seconds per new shape and gained ~15% on large blocks.)"""

    def keep_better(x, imp, s, b, best):
        s, b = s.astype(dtype).astype(mx.float32), b.astype(dtype).astype(mx.float32)  # stored precision
        q = _affine_codes(x, s, b, n)
        err = (imp * (s[..., None] * q + b[..., None] - x) ** 2).sum(-1)
        better = err < best[0]
        return mx.where(better, err, best[0]), mx.where(better, s, best[1]), mx.where(better, b, best[2])

    def first(x, imp, s, b):
        return keep_better(x, imp, s, b, (mx.full(s.shape, mx.inf), s, b))

    def scan(x, imp, lo, rng, d, err, best_s, best_b):  # one clipping range, refined by least squares
        q = mx.clip(mx.round((n + d) / rng[..., None] * (x - lo[..., None])), 0, n)
        s, b, ok = _wls(q, x, imp)
        ok = ok & (s > 0)
        return keep_better(x, imp, mx.where(ok, s, rng / n), mx.where(ok, b, lo), (err, best_s, best_b))

    def refine(x, imp, err, best_s, best_b):  # least squares on the best codes, then re-round
        s, b, ok = _wls(_affine_codes(x, best_s, best_b, n), x, imp)
        ok = ok & (s > 0)
        return keep_better(x, imp, mx.where(ok, s, best_s), mx.where(ok, b, best_b), (err, best_s, best_b))

    return first, scan, refine


def _iq_affine(x, imp, fmt: Format, plain, dtype) -> dict[str, mx.array]:
    n = 2**fmt.bits - 1
    first, scan, refine = _affine_fns(n, dtype)
    lo, hi = x.min(-1), x.max(-1)
    rng = mx.maximum(hi - lo, 1e-30)
    best = first(x, imp, plain[1].astype(mx.float32), plain[2].astype(mx.float32))  # MLX's own choice first
    for d in AFFINE_STEPS:
        best = scan(x, imp, lo, rng, mx.array(d, mx.float32), *best)
        mx.eval(best)  # keep the graph small
    for _ in range(2):
        best = refine(x, imp, *best)
    _, s, b = best
    q = _affine_codes(x, s, b, n).astype(mx.uint32)
    return {"weight": pack(q.reshape(*x.shape[:-2], -1), fmt.bits), "scales": s.astype(dtype), "biases": b.astype(dtype)}


# --- microscaling floats (mxfp4, nvfp4, mxfp8) -------------------------------------------------------
def _fp_round(y, mode):
    """y (already divided by the scale) -> (codes, values) in the element format, saturating."""
    m = FP_MAX[mode]
    y = mx.clip(y, -m, m)
    if mode == "mxfp8":
        codes = mx.to_fp8(y)
        return codes.astype(mx.uint32), mx.from_fp8(codes, dtype=mx.float32)
    idx = mx.zeros(y.shape, mx.uint32)
    a = mx.abs(y)
    for t in _FP4_MIDS:
        idx = idx + (a > t).astype(mx.uint32)
    vals = mx.take(mx.array(FP4_VALUES), idx)
    neg = (y < 0) & (idx > 0)  # MLX writes zero as +0
    return idx + 8 * neg.astype(mx.uint32), mx.where(neg, -vals, vals)


def _scale_value(code, mode):
    """uint8 scale codes -> float32 scale (e8m0 = 2^(code-127); e4m3 for nvfp4)."""
    if mode == "nvfp4":
        return mx.from_fp8(code, dtype=mx.float32)
    return mx.power(2.0, code.astype(mx.float32) - 127)


def _e4m3(s):
    return mx.to_fp8(mx.clip(s, 0, 448.0))


def _iq_fp(x, imp, fmt: Format, plain) -> dict[str, mx.array]:
    mode = fmt.mode
    best = {"err": None}

    def consider(code):
        s = _scale_value(code, mode)
        safe = mx.where(s == 0, 1.0, s)
        q, v = _fp_round(x / safe[..., None], mode)
        err = (imp * (v * s[..., None] - x) ** 2).sum(-1)
        if best["err"] is None:
            best.update(err=err, code=code, q=q, v=v)
            return
        better = err < best["err"]
        best.update(err=mx.where(better, err, best["err"]), code=mx.where(better, code, best["code"]),
                    q=mx.where(better[..., None], q, best["q"]), v=mx.where(better[..., None], v, best["v"]))
        mx.eval(best["err"], best["code"], best["q"], best["v"])

    consider(plain[1])  # MLX's own scale first
    amax = mx.maximum(mx.abs(x).max(-1), 1e-30)
    if mode == "nvfp4":
        for f in NV_FACTORS + [1.0]:
            consider(_e4m3(amax / 6.0 * f))
        for _ in range(2):  # weighted least squares for the scale given the best codes
            v = best["v"]
            den = (imp * v * v).sum(-1)
            s = mx.where(den > 0, (imp * v * x).sum(-1) / mx.where(den > 0, den, 1.0), amax / 6.0)
            consider(_e4m3(s))
    else:
        k0 = mx.floor(mx.log2(amax)) - FP_EMAX[mode]
        for dk in (-1, 0, 1):
            consider(mx.clip(k0 + dk + 127, 0, 254).astype(mx.uint8))
    lead = x.shape[:-2]
    return {"weight": pack(best["q"].reshape(*lead, -1), fmt.bits), "scales": best["code"].astype(mx.uint8)}


# --- measuring -----------------------------------------------------------------------------------------
def dequantize(arrays: dict, fmt: Format) -> mx.array:
    """The float32 weight MLX computes with."""
    if not fmt.quantized:
        return arrays["weight"].astype(mx.float32)
    return mx.dequantize(arrays["weight"], arrays["scales"], arrays.get("biases"), fmt.group_size, fmt.bits,
                         mode=fmt.mode, dtype=mx.float32)


def weighted_error(w: mx.array, arrays: dict, fmt: Format, importance: mx.array | None = None) -> float:
    """sum_j imp_j * (w - w^)^2 over the whole weight (importance broadcast over rows)."""
    d = (w.astype(mx.float32) - dequantize(arrays, fmt)) ** 2
    return float((d if importance is None else d * importance.astype(mx.float32)).sum())


def output_error(w: mx.array, arrays: dict, fmt: Format, x) -> float:
    """Relative error of the layer's output on real activations x [T, in]: |x W^T - x W^^T|^2 / |x W^T|^2.
    (NumPy's BLAS: MLX's CPU matmul is far slower on Linux.)"""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    y = x @ np.asarray(w.astype(mx.float32)).T
    d = y - x @ np.asarray(dequantize(arrays, fmt)).T
    return float((d.astype(np.float64) ** 2).sum() / (y.astype(np.float64) ** 2).sum())
