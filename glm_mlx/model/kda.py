"""Kimi Delta Attention (KDA), GLM-5.3-Flash's linear-attention layer.

Per head (Dk = Dv = linear_head_dim), with a fixed-size state S [Dv, Dk] (mlx-lm's layout):
    S_t = S_{t-1} * exp(g_t)[None, :]            per-channel forget gate, log-space g_t <= 0
    S_t += beta_t * (v_t - S_t k_t) k_t^T           delta rule (k_t, q_t L2-normalised)
    o_t = S_t q_t / sqrt(Dk)
q, k, v come from a short causal depthwise conv (SiLU) over [q_proj | k_proj | v_proj]; the gate is
g = lb * sigmoid(exp(A_log) * (f_b(f_a(x)) + dt_bias)) with the lower bound lb (linear_lower_bound),
or -exp(A_log) * softplus(...) without one; beta = sigmoid(b_proj(x)); the output is a gated
RMSNorm (rmsnorm(o) * w * sigmoid(g_b(g_a(x)))) per head, then o_proj.

What comes from mlx-lm (mlx_lm.models.gated_delta): the recurrent form, `gated_delta_update` (its
Metal kernel on the GPU, its ops loop elsewhere), which takes the per-channel ("vectorized") gate
[B, T, H, Dk] and computes exp(g) from (A_log, a, dt_bias, lower_bound) exactly as above, and
`normalize_qk` (the reference's l2norm with eps on sum(x^2), scale folded into q). Kimi Linear in
mlx-lm is the same layer with three separate convs; its gate shape is the same.

What is written here and why: mlx-lm has no chunked form, only the token-by-token recurrence, and
on the CPU backend that is T small steps per layer. `chunk_kda` is the WY/UT chunked form of the
reference's `chunk_kimi_delta_attention`, with the exact pairwise per-channel decay (no factored
exp(+g) / exp(-g), which overflows for strong gates) in chunks of CHUNK tokens, the intra-chunk
part computed for groups of chunks under a memory budget. mlx-lm's `compute_lower_bound_g` returns
exp(g); the chunked form needs g itself (its cumulative sums), so `log_gate` computes it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk

CHUNK = 16  # tokens per chunk: the pairwise decay is [CHUNK, CHUNK, Dk] per chunk and head
CHUNK_GROUP_BYTES = 1 << 26  # budget of one group of chunks' pairwise-decay tensor
RECURRENT_MAX_TOKENS = 16  # at most this many new tokens: the recurrent form (decode, MTP verification)
KEEP_STATES_MAX = 8  # multi-token updates up to this long keep per-token states (MTP rollback)


def log_gate(a: mx.array, A_log: mx.array, dt_bias: mx.array, lower_bound: float | None) -> mx.array:
    """a [B, T, H, Dk] (f_b(f_a(x))), A_log [H, 1], dt_bias [H, Dk] -> log-space gate g [B, T, H, Dk] f32."""
    x = a.astype(mx.float32) + dt_bias.astype(mx.float32)
    rate = mx.exp(A_log.astype(mx.float32))
    if lower_bound is not None:
        return lower_bound * mx.sigmoid(rate * x)
    return -rate * nn.softplus(x)


def chunk_kda(q, k, v, g, beta, state=None, chunk: int = CHUNK):
    """Chunked KDA. q, k [B, T, H, Dk] (normalised, q scaled), v [B, T, H, Dv], g [B, T, H, Dk] log
    gate, beta [B, T, H], state [B, H, Dv, Dk] f32 or None -> (out [B, T, H, Dv] f32, state)."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C, pad = chunk, (-T) % chunk
    N = (T + pad) // C

    def prep(x):  # [B, T, H, D] -> [B, H, N, C, D] f32 (zero padded: padded steps change nothing)
        x = mx.pad(x.astype(mx.float32), [(0, 0), (0, pad), (0, 0), (0, 0)])
        return x.transpose(0, 2, 1, 3).reshape(B, H, N, C, x.shape[-1])

    q, k, v, g = prep(q), prep(k), prep(v), prep(g)
    beta = prep(beta[..., None])  # [B, H, N, C, 1]
    g = mx.cumsum(g, axis=-2)  # within each chunk
    kb, vb = k * beta, v * beta
    lower = mx.tril(mx.ones((C, C), dtype=mx.bool_))  # j <= i
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)  # j < i

    # Intra-chunk parts for groups of chunks: w [.., C, Dk], u [.., C, Dv], qk [.., C, C].
    group = max(1, CHUNK_GROUP_BYTES // max(1, B * H * C * C * Dk * 4))
    ws, us, qks = [], [], []
    for s in range(0, N, group):
        e = min(N, s + group)
        gs = g[:, :, s:e]
        diff = gs[..., :, None, :] - gs[..., None, :, :]  # [B, H, n, C(i), C(j), Dk]: g_i - g_j
        decay = mx.exp(mx.where(lower[..., None], diff, -mx.inf))
        a = -(kb[:, :, s:e, :, None, :] * k[:, :, s:e, None, :, :] * decay).sum(-1)  # [B, H, n, C, C]
        a = mx.where(strict, a, 0.0)
        # Forward substitution, row by row (the reference's loop): rows < i are final when row i is built.
        rows = [a[..., 0, :]]
        for i in range(1, C):
            row = a[..., i, :]  # [B, H, n, C]; only columns < i are non-zero
            prev = mx.stack(rows, axis=-2)  # [B, H, n, i, C]
            rows.append(row + (row[..., :i, None] * prev).sum(-2))
        t = mx.stack(rows, axis=-2) + mx.eye(C)  # [B, H, n, C, C]
        us.append(t @ vb[:, :, s:e])
        ws.append(t @ (kb[:, :, s:e] * mx.exp(gs)))
        qk = (q[:, :, s:e, :, None, :] * k[:, :, s:e, None, :, :] * decay).sum(-1)  # [B, H, n, C, C]
        qks.append(mx.where(lower, qk, 0.0))
    w, u, qk = (mx.concatenate(x, axis=2) if len(x) > 1 else x[0] for x in (ws, us, qks))

    S = mx.zeros((B, H, Dk, Dv), mx.float32) if state is None else state.astype(mx.float32).swapaxes(-1, -2)
    outs = []
    for n in range(N):  # inter-chunk: the state carried from chunk to chunk ([Dk, Dv] here)
        gn, kn = g[:, :, n], k[:, :, n]  # [B, H, C, Dk]
        v_new = u[:, :, n] - w[:, :, n] @ S  # [B, H, C, Dv]
        outs.append((q[:, :, n] * mx.exp(gn)) @ S + qk[:, :, n] @ v_new)
        last = gn[..., -1:, :]  # [B, H, 1, Dk]
        S = S * mx.exp(last).swapaxes(-1, -2) + (kn * mx.exp(last - gn)).swapaxes(-1, -2) @ v_new
    out = mx.stack(outs, axis=2).reshape(B, H, N * C, Dv)[:, :, :T]  # [B, H, N, C, Dv] -> [B, H, T, Dv]
    return out.transpose(0, 2, 1, 3), S.swapaxes(-1, -2)


def recurrent_kda(q, k, v, a, b, A_log, dt_bias, lower_bound, state=None, keep_states: bool = False):
    """mlx-lm's gated-delta recurrence with KDA's per-channel gate. a [B, T, H, Dk] (gate logits before
    dt_bias), b [B, T, H] (beta logits). Returns (out [B, T, H, Dv], [state after each token] when
    keep_states, else [final state])."""
    if not keep_states:
        out, state = gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, lower_bound=lower_bound)
        return out, [state]
    outs, states = [], []
    for t in range(q.shape[1]):  # one step at a time: every intermediate state is kept for a rollback
        o, state = gated_delta_update(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], a[:, t:t + 1], b[:, t:t + 1],
                                      A_log, dt_bias, state, lower_bound=lower_bound)
        outs.append(o)
        states.append(state)
    return mx.concatenate(outs, axis=1), states


def segments(run, cuts: list[int], L: int, state):
    """Run a recurrence over [0, L) in pieces ending at each cut and at L, each from the state the one
    before reached: run(start, end, state) -> (out [B, end-start, H, Dv], state or [state]).
    Returns (out [B, L, H, Dv], {end: the state after it})."""
    outs, at, s = [], {}, 0
    for e in [c for c in cuts if 0 < c < L] + [L]:
        out, state = run(s, e, state)
        state = state[-1] if isinstance(state, list) else state
        outs.append(out)
        at[e], s = state, e
    return (outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)), at


def causal_conv(x: mx.array, weight: mx.array, state: mx.array | None) -> tuple[mx.array, mx.array]:
    """Depthwise causal conv + SiLU. x [B, L, C], weight [C, K, 1] (MLX conv layout), state [B, K-1, C]
    (the previous K-1 inputs; zeros at the start) -> (out [B, L, C] in x's dtype, conv input [B, K-1+L, C])."""
    B, L, C = x.shape
    K = weight.shape[1]
    if state is None:
        state = mx.zeros((B, K - 1, C), x.dtype)
    full = mx.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+L, C]
    w = weight[..., 0].astype(mx.float32)  # [C, K]; the reference convolves in the weight's float32
    f = full.astype(mx.float32)
    out = sum(f[:, j:j + L] * w[:, j] for j in range(K))  # cross-correlation, as torch's conv1d
    return nn.silu(out).astype(x.dtype), full


class ShortConv(nn.Module):
    """The depthwise causal conv over [q | k | v] channels: weight [C, K, 1], kept in float32."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel, 1), dtype=mx.float32)

    def __call__(self, x, state):
        return causal_conv(x, self.weight, state)


class GatedRMSNorm(nn.Module):
    """rmsnorm(x) * weight * sigmoid(gate), in float32 (the reference's RMSNormGated)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x, gate):
        y = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
        return (y * mx.sigmoid(gate.astype(mx.float32))).astype(x.dtype)


class KimiDeltaAttention(nn.Module):
    """One KDA layer. Parameter names are the checkpoint's (q/k/v_conv1d concatenated into conv1d)."""

    def __init__(self, args):
        super().__init__()
        H, D, hidden = args.linear_num_heads, args.linear_head_dim, args.hidden_size
        self.num_heads, self.head_dim = H, D
        self.lower_bound = args.linear_lower_bound
        self.q_proj = nn.Linear(hidden, H * D, bias=False)
        self.k_proj = nn.Linear(hidden, H * D, bias=False)
        self.v_proj = nn.Linear(hidden, H * D, bias=False)
        self.conv1d = ShortConv(3 * H * D, args.linear_conv_kernel_dim)
        self.f_a_proj = nn.Linear(hidden, D, bias=False)
        self.f_b_proj = nn.Linear(D, H * D, bias=False)
        self.dt_bias = mx.zeros((H * D,), dtype=mx.float32)
        self.A_log = mx.zeros((H,), dtype=mx.float32)
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_a_proj = nn.Linear(hidden, D, bias=False)
        self.g_b_proj = nn.Linear(D, H * D, bias=False)
        self.o_norm = GatedRMSNorm(D, args.rms_norm_eps)
        self.o_proj = nn.Linear(H * D, hidden, bias=False)
        self.prefill = "auto"  # "auto" | "chunked" | "recurrent": how to run more than RECURRENT_MAX_TOKENS

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, L, _ = x.shape
        H, D = self.num_heads, self.head_dim
        mixed = mx.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)  # [B, L, 3HD]
        mixed, conv_input = self.conv1d(mixed, cache.conv if cache is not None else None)
        q, k, v = (t.reshape(B, L, H, D).astype(mx.float32) for t in mx.split(mixed, 3, axis=-1))
        q, k = normalize_qk(q, k, inv_scale=D**-0.5, eps=1e-6)  # l2norm; q also scaled by D^-0.5
        a = self.f_b_proj(self.f_a_proj(x)).reshape(B, L, H, D)  # per-channel gate logits
        b = self.b_proj(x)  # [B, L, H] beta logits
        state = cache.recurrent if cache is not None else None
        A_log, dt_bias = self.A_log.reshape(H, 1), self.dt_bias.reshape(H, D)
        # States the cache keeps inside this update (prefix-cache block boundaries): the recurrence
        # stops there and goes on from the state it reached (the projections above ran once).
        cuts = cache.cuts(L) if cache is not None else []
        at = {}
        if self._recurrent(L):
            keep = cache is not None and 1 < L <= KEEP_STATES_MAX
            if keep or not cuts:
                out, states = recurrent_kda(q, k, v, a, b, A_log, dt_bias, self.lower_bound, state, keep_states=keep)
            else:
                out, at = segments(lambda s, e, st: recurrent_kda(q[:, s:e], k[:, s:e], v[:, s:e], a[:, s:e], b[:, s:e],
                                                                  A_log, dt_bias, self.lower_bound, st),
                                   cuts, L, state)
                states = [at[L]]
        else:
            g = log_gate(a, A_log, dt_bias, self.lower_bound)
            beta = mx.sigmoid(b.astype(mx.float32))
            out, at = segments(lambda s, e, st: chunk_kda(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], st),
                               cuts, L, state)
            states = [at[L]]
        if cache is not None:
            cache.commit(conv_input, states, at)
        gate = self.g_b_proj(self.g_a_proj(x)).reshape(B, L, H, D)
        out = self.o_norm(out.astype(x.dtype), gate).reshape(B, L, H * D)
        return self.o_proj(out)

    def _recurrent(self, L: int) -> bool:
        if self.prefill != "auto":
            return L <= RECURRENT_MAX_TOKENS if self.prefill == "chunked" else True
        # mlx-lm's Metal kernel runs the recurrence fast at any length; elsewhere chunk long inputs.
        return L <= RECURRENT_MAX_TOKENS or (mx.default_device() == mx.gpu and mx.metal.is_available())
