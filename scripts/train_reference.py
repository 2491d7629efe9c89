"""Train glm-mini: a small GLM-5.1-architecture (glm_moe_dsa) model that ships with glm-mlx.

    python scripts/train_reference.py        # writes glm_mlx/data/glm-mini/ and docs/loss_curve.png
    python scripts/train_reference.py --steps 20 --out /tmp/smoke --plot /tmp/smoke/loss.png

640 steps of 8 x 256 tokens (1.3M tokens): 47 min on a 2-core CPU shared with other jobs. On
Linux it re-executes itself with OpenBLAS preloaded (see reference_ops.ensure_fast_blas):
install it with `apt-get install libopenblas0-pthread`. The corpus download needs `pip` and
`apt-get download` (run `apt-get update` once).

Same architecture as GLM-5.1, built from glm_mlx.model.glm_moe_dsa.Model: MLA, the DSA indexer
(index_topk 64 at training context 256), dense layers then MoE layers (shared expert, sigmoid
router with the aux-loss-free correction bias), and one MTP layer. Schedule:
  1. dense phase: the main model attends densely and learns next-token + MTP (token after next)
     losses; the indexer, on detached inputs, is warmed up by KL to the main attention
     distribution (summed over heads, renormalised) -- DeepSeek-V3.2's dense warm-up;
  2. sparse phase: attention is restricted to the indexer's top-k keys; the indexer keeps
     learning by KL over the selected keys.
After every step each router's correction bias moves by `bias_rate * sign(mean load - load)`.
Float32 training (the CPU backend's gather_mm needs it); the checkpoint is saved in bfloat16 in
the real HF layout (per-expert tensors, joined kv_b_proj) plus the MTP layer at model.layers.N.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_data as rd
import reference_ops as ops

from glm_mlx.model.config import ModelArgs
from glm_mlx.model.glm_moe_dsa import Model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "glm_mlx" / "data" / "glm-mini"

# Dims sized for a 2-core CPU run of under an hour and an ~11 MB bfloat16 checkpoint.
CONFIG = dict(
    architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa", dtype="bfloat16",
    vocab_size=6144, hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=4, first_k_dense_replace=2, moe_layer_freq=1, num_nextn_predict_layers=1,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, qk_head_dim=48, v_head_dim=32, head_dim=16,
    index_topk=64, index_head_dim=32, index_n_heads=4, indexer_rope_interleave=True, rope_interleave=True,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
    hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False, initializer_range=0.02,
    use_cache=True, pad_token_id=0, eos_token_id=None,  # eos filled in from the tokenizer
)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--cache", type=Path, default=ROOT / "build" / "reference_corpus", help="corpus download folder")
    p.add_argument("--steps", type=int, default=640)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--dense-frac", type=float, default=0.5, help="fraction of steps before sparse attention")
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--bias-rate", type=float, default=1e-2,
                   help="router bias step per update (DeepSeek uses 1e-3 over far more steps)")
    p.add_argument("--chat-frac", type=float, default=0.25, help="fraction of sequences that are chat turns")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=6144, help="BPE vocabulary (the 10 tool tags come on top)")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "loss_curve.png")
    return p.parse_args()


class Data:
    """Token streams: plain text (works joined by <|endoftext|>) and chat turns (windows start at a turn)."""

    def __init__(self, corpus: dict, tokenizer, seed: int):
        eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        enc = tokenizer.backend_tokenizer.encode  # the fast tokenizer itself: no length warnings

        def stream(docs):
            ids, starts = [], []
            for d in docs:
                starts.append(len(ids))
                ids += enc(d, add_special_tokens=False).ids + [eot]
            return np.array(ids, np.int32), np.array(starts)

        self.plain, _ = stream(corpus["train"])
        chats = [rd.render_chat(tokenizer, m) for m in corpus["chat"]]
        np.random.RandomState(seed).shuffle(chats)
        self.chat, self.chat_starts = stream(chats)
        self.heldout, _ = stream(corpus["heldout"])
        self.rng = np.random.RandomState(seed)

    def batch(self, B: int, L: int, chat_frac: float) -> mx.array:
        rows = []
        for _ in range(B):
            if self.rng.rand() < chat_frac:
                s = min(self.rng.choice(self.chat_starts), len(self.chat) - L)
                rows.append(self.chat[s : s + L])
            else:
                s = self.rng.randint(0, len(self.plain) - L)
                rows.append(self.plain[s : s + L])
        return mx.array(np.stack(rows))

    def heldout_windows(self, L: int, n: int) -> mx.array:
        starts = np.linspace(0, len(self.heldout) - L, n).astype(int)
        return mx.array(np.stack([self.heldout[s : s + L] for s in starts]))


def init_weights(model: Model, seed: int):
    """Small normal init (std 0.02, output projections scaled by depth), unit norms, zero biases."""
    mx.random.seed(seed)
    depth = model.args.num_hidden_layers + 1
    new = []
    for k, v in tree_flatten(model.parameters()):
        if k.endswith(("e_score_correction_bias", ".bias")):
            new.append((k, mx.zeros_like(v)))
        elif v.ndim == 1:
            new.append((k, mx.ones_like(v)))
        else:
            std = 0.02 / math.sqrt(2 * depth) if k.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            new.append((k, mx.random.normal(v.shape) * std))
    model.update(tree_unflatten(new))


def cross_entropy(logits, targets):
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def heldout_loss(model: Model, windows: mx.array) -> float:
    """Mean next-token loss through the inference forward pass (DSA active past index_topk)."""
    losses = []
    for i in range(0, windows.shape[0], 8):
        w = windows[i : i + 8]
        losses.append(cross_entropy(model(w[:, :-1]), w[:, 1:]))
    return float(mx.stack(losses).mean())


def main():
    args = parse()
    ops.ensure_fast_blas()
    t0 = time.time()
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "training_log.txt"
    log_file = log_path.open("w")

    def log(msg):
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"args: {vars(args)}")
    corpus = rd.build_corpus(args.cache)
    log(f"corpus {corpus['sha']}: {len(corpus['train'])} train docs, {len(corpus['heldout'])} held-out blocks, "
        f"{len(corpus['chat'])} chat turns")
    tokenizer = rd.train_tokenizer(corpus["train"], args.vocab, args.out)
    data = Data(corpus, tokenizer, args.seed)
    log(f"tokens: plain {len(data.plain):,}, chat {len(data.chat):,}, held-out {len(data.heldout):,}; "
        f"vocab {len(tokenizer)}")

    config = dict(CONFIG, vocab_size=len(tokenizer),  # BPE merges + the tool tags
                  eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in rd.EOS_TOKENS],
                  pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    margs = ModelArgs.from_dict(config)
    model = Model(margs, mtp=True)
    init_weights(model, args.seed)
    model.freeze(keys=["e_score_correction_bias"])  # moved by the load-balancing rule, not by gradients
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"parameters: {n_params:,}")

    optimizer = optim.AdamW(learning_rate=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    blocks = ops.moe_blocks(model)
    E = margs.n_routed_experts
    state = [model.state, optimizer.state]

    def loss_fn(tokens, sparse):
        logits, mtp_logits, kl, inds = ops.forward(model, tokens, sparse)
        ce = cross_entropy(logits[:, :-1], tokens[:, 1:])
        mtp_ce = cross_entropy(mtp_logits[:, :-1], tokens[:, 2:])
        loss = ce + args.mtp_weight * mtp_ce + args.kl_weight * kl
        return loss, (ce, mtp_ce, kl, mx.stack([ops.expert_load(i, E) for i in inds]))

    def make_step(sparse: bool):
        # Not mx.compile'd: the sparse graph trips the compiler (IndexError), and eager is as fast here.
        def step(tokens, lr):
            (_, aux), grads = nn.value_and_grad(model, loss_fn)(tokens, sparse)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            optimizer.learning_rate = lr
            optimizer.update(model, grads)
            ce, mtp_ce, kl, loads = aux
            for b, load in zip(blocks, loads):  # aux-loss-free balancing: raise under-loaded experts
                b.gate.e_score_correction_bias = b.gate.e_score_correction_bias + args.bias_rate * mx.sign(1.0 / E - load)
            return ce, mtp_ce, kl, loads

        return step

    dense_step, sparse_step = make_step(False), make_step(True)
    windows = data.heldout_windows(args.seq + 1, 24)
    n_dense = int(args.steps * args.dense_frac)
    history = {"step": [], "train": [], "mtp": [], "kl": [], "eval_step": [], "heldout": []}
    t_train = time.time()
    ce_acc, mtp_acc, kl_acc, n_acc = 0.0, 0.0, 0.0, 0
    for it in range(args.steps):
        sparse = it >= n_dense
        if it == n_dense:
            log(f"step {it}: switching to sparse attention (index_topk={margs.index_topk})")
        tokens = data.batch(args.batch, args.seq, args.chat_frac)
        ce, mtp_ce, kl, loads = (sparse_step if sparse else dense_step)(tokens, mx.array(lr_at(it, args)))
        mx.eval(state, ce, mtp_ce, kl, loads)
        ce_acc, mtp_acc, kl_acc, n_acc = ce_acc + ce.item(), mtp_acc + mtp_ce.item(), kl_acc + kl.item(), n_acc + 1
        if (it + 1) % 10 == 0 or it == 0:
            history["step"].append(it + 1)
            history["train"].append(ce_acc / n_acc)
            history["mtp"].append(mtp_acc / n_acc)
            history["kl"].append(kl_acc / n_acc)
            tps = (it + 1) * args.batch * args.seq / (time.time() - t_train)
            imb = float(mx.max(loads)) * E
            log(f"step {it + 1:5d} loss {ce_acc / n_acc:.3f} mtp {mtp_acc / n_acc:.3f} kl {kl_acc / n_acc:.3f} "
                f"max-load/mean {imb:.2f} lr {lr_at(it, args):.2e} {tps:,.0f} tok/s")
            ce_acc, mtp_acc, kl_acc, n_acc = 0.0, 0.0, 0.0, 0
        if (it + 1) % args.eval_every == 0 or it + 1 == args.steps:
            h = heldout_loss(model, windows)
            history["eval_step"].append(it + 1)
            history["heldout"].append(h)
            log(f"step {it + 1:5d} held-out loss {h:.3f} (ppl {math.exp(h):.1f})")
    train_time = time.time() - t_train
    log(f"training time {train_time:.0f}s ({train_time / 60:.1f} min)")
    biases = [np.round(np.array(b.gate.e_score_correction_bias), 3).tolist() for b in blocks]
    log(f"router correction biases: {biases}")

    save(model, config, args.out)
    (args.out / "training_history.json").write_text(json.dumps(history))
    plot(history, args.plot, n_dense)
    log(f"saved {args.out} and {args.plot}; total {time.time() - t0:.0f}s")


def save(model: Model, config: dict, out: Path):
    """bfloat16 HF-layout safetensors (router correction biases stay float32, as in GLM-5.1)."""
    weights = ops.unsanitize(model)
    weights = {k: (v if "e_score_correction_bias" in k else v.astype(mx.bfloat16)) for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def plot(history: dict, path: Path, n_dense: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["train"], label="train: next token", lw=1)
    ax.plot(history["step"], history["mtp"], label="train: MTP (token after next)", lw=1)
    ax.plot(history["eval_step"], history["heldout"], "o-", label="held-out: next token", ms=3)
    ax.axvline(n_dense, color="grey", ls="--", lw=0.8)
    ax.text(n_dense, ax.get_ylim()[1] * 0.95, " sparse attention on", fontsize=8, color="grey", va="top")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("glm-mini (glm_moe_dsa) training")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
