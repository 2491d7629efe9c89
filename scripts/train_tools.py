"""Fine-tune glm-mini on GLM-5.x's chat format with tools (tool calls, observations, thinking on/off).

    python scripts/train_tools.py                       # glm_mlx/data/glm-mini -> glm_mlx/data/glm-mini
    python scripts/train_tools.py --steps 5 --out /tmp/smoke

Starts from the shipped checkpoint and
  1. adds GLM's tool tags (reference_data.TOOL_TOKENS) to the tokenizer as single tokens, grows
     embed_tokens / lm_head by those rows (mean of the existing rows + small noise; the MTP layer
     shares both), and installs the GLM-5.x chat template (reference_data.CHAT_TEMPLATE);
  2. trains with train_reference.py's machinery (reference_ops.forward: sparse DSA attention,
     indexer KL, MTP loss) on two batches per step:
       * synthetic tool conversations (tool_data.py), loss on the assistant's tokens only
         (reasoning, tool calls, final answers and the end token of each turn);
       * the original corpus (plain text, and its chat turns re-rendered in the new format), loss on
         every token, so held-out perplexity stays where it was;
  3. saves bfloat16 weights in the same HF layout as train_reference.save, the tokenizer and the
     template; the log goes to tools_training_log.txt beside the weights.
Router correction biases stay frozen. Float32 on the CPU (OpenBLAS preloaded on Linux).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_data as rd
import reference_ops as ops
import tool_data as td
import train_reference as tr

from glm_mlx.model.loading import load

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "glm_mlx" / "data" / "glm-mini"
END_TOKENS = ["<|user|>", "<|observation|>", "<|endoftext|>", "<|system|>"]


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=DEFAULT, help="checkpoint to start from")
    p.add_argument("--out", type=Path, default=DEFAULT)
    p.add_argument("--cache", type=Path, default=ROOT / "build" / "reference_corpus")
    p.add_argument("--steps", type=int, default=260)
    p.add_argument("--tool-tokens", type=int, default=2560, help="token budget of a tool batch (B x padded L)")
    p.add_argument("--batch", type=int, default=6, help="corpus rows per step")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chat-frac", type=float, default=0.25)
    p.add_argument("--lr", type=float, default=6e-4, help="peak; 1.5e-3 cost +0.3 nats of held-out loss")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--examples", type=int, default=4000, help="synthetic tool conversations generated")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ppl", action="store_true", help="skip the before/after held-out perplexity")
    p.add_argument("--call-weight", type=float, default=1.0, help="loss weight of <tool_call>...</tool_call> tokens")
    p.add_argument("--value-weight", type=float, default=None,
                   help="loss weight of <arg_value>...</arg_value> tokens (default: --call-weight)")
    p.add_argument("--think-weight", type=float, default=1.0,
                   help="loss weight of a reasoning (<think>...</think>; it names the values the call copies)")
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="loss weight of an answer to a tool's result (it copies values from the result)")
    p.add_argument("--drill-think", type=float, default=0.25, help="share of copy drills with reasoning")
    p.add_argument("--short-frac", type=float, default=0.0,
                   help="share of short copy drills (one tool offered, one call; tool_data.conversation)")
    p.add_argument("--focus", help="a function that a share --focus-frac of the conversations is about")
    p.add_argument("--focus-frac", type=float, default=0.0)
    p.add_argument("--blend", type=float, default=1.0,
                   help="save start + blend * (trained - start): < 1 trades tool skill for held-out perplexity")
    return p.parse_args()


def grow_vocab(model, new_size: int, seed: int):
    """Append rows to embed_tokens and lm_head: mean of the existing rows + noise (0.1 x their std)."""
    mx.random.seed(seed)
    for mod in (model.model.embed_tokens, model.lm_head):
        w = mod.weight
        n = new_size - w.shape[0]
        if n <= 0:
            continue
        rows = w.mean(axis=0, keepdims=True) + 0.1 * w.std() * mx.random.normal((n, w.shape[1]))
        mod.weight = mx.concatenate([w, rows.astype(w.dtype)], axis=0)
    model.args.vocab_size = new_size


def blend(model, start: dict, alpha: float):
    """Parameters <- start + alpha * (current - start) (a linear path back towards the start)."""
    model.load_weights([(k, start[k] + alpha * (v - start[k])) for k, v in tree_flatten(model.parameters())])
    mx.eval(model.parameters())


def assistant_mask(ids: list[int], assistant: int, ends: set[int], call: tuple[int, int] = (-1, -1),
                   call_weight: float = 1.0, value: tuple[int, int] = (-1, -1),
                   value_weight: float | None = None, think: tuple[int, int] = (-1, -1),
                   think_weight: float = 1.0, observation: int = -1, answer_weight: float = 1.0) -> np.ndarray:
    """Loss weights: 1 for tokens the assistant generates (after `<|assistant|>` and its given first
    token, `<think>` or `</think>`, which the generation prompt supplies, up to and including the end
    token), call_weight for those from `<tool_call>` to `</tool_call>`, value_weight (default
    call_weight) for the argument values after `<arg_value>` up to and including `</arg_value>`,
    think_weight for a reasoning (after a given `<think>`, up to and including `</think>`),
    answer_weight for the rest of a turn that answers a tool's result (after `<|observation|>`), else 0."""
    value_weight = call_weight if value_weight is None else value_weight
    m = np.zeros(len(ids), np.float32)
    state = 0  # 0 outside, 1 right after <|assistant|>, 2 inside
    in_call = in_value = in_think = after_result = in_answer = False
    for i, t in enumerate(ids):
        after_result = after_result or t == observation
        if state == 2:
            in_call = in_call or t == call[0]
            m[i] = (value_weight if in_value else call_weight if in_call else think_weight if in_think
                    else answer_weight if in_answer else 1.0)
            in_think = in_think and t != think[1]
            in_call = in_call and t != call[1]
            in_value = (in_value or t == value[0]) and t != value[1]
            if t in ends:
                state = 0
        elif state == 1:
            state, in_think = 2, t == think[0]
        if t == assistant and state == 0:
            state, in_answer, after_result = 1, after_result, False
    return m


class ToolData:
    """Rendered tool conversations, batched by length under a token budget."""

    def __init__(self, tokenizer, n: int, seed: int, budget: int, call_weight: float = 1.0,
                 focus: str | None = None, focus_frac: float = 0.0, value_weight: float | None = None,
                 short_frac: float = 0.0, think_weight: float = 1.0, drill_think: float = 0.25,
                 answer_weight: float = 1.0):
        enc = tokenizer.backend_tokenizer.encode
        asst = tokenizer.convert_tokens_to_ids("<|assistant|>")
        ends = {tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS}
        call = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
        value = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<arg_value>", "</arg_value>"))
        think = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
        observation = tokenizer.convert_tokens_to_ids("<|observation|>")
        self.eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.rows = []
        for ex in td.dataset(n, seed=seed, focus=focus, focus_frac=focus_frac, short_frac=short_frac,
                             drill_think=drill_think):
            text = tokenizer.apply_chat_template(ex["messages"], tools=ex["tools"], tokenize=False) + "<|endoftext|>"
            ids = enc(text, add_special_tokens=False).ids
            self.rows.append((np.array(ids, np.int32), assistant_mask(ids, asst, ends, call, call_weight, value, value_weight,
                                                                       think, think_weight, observation, answer_weight)))
        self.rng = np.random.RandomState(seed)
        self.budget = budget
        self.order, self.pos = [], 0

    def _refill(self):
        idx = self.rng.permutation(len(self.rows))
        chunks = []
        for s in range(0, len(idx), 64):  # sort within mega-batches: little padding, still shuffled
            mega = sorted(idx[s : s + 64], key=lambda i: len(self.rows[i][0]))
            i = 0
            while i < len(mega):
                L = len(self.rows[mega[min(i + 1, len(mega) - 1)]][0])
                b = max(1, self.budget // L)
                chunks.append(mega[i : i + b])
                i += b
        self.rng.shuffle(chunks)
        self.order, self.pos = chunks, 0

    def batch(self) -> tuple[mx.array, mx.array]:
        if self.pos >= len(self.order):
            self._refill()
        chunk = self.order[self.pos]
        self.pos += 1
        L = max(len(self.rows[i][0]) for i in chunk)
        L = -(-L // 16) * 16
        toks = np.full((len(chunk), L), self.eot, np.int32)
        mask = np.zeros((len(chunk), L), np.float32)
        for r, i in enumerate(chunk):
            ids, m = self.rows[i]
            toks[r, : len(ids)] = ids
            mask[r, : len(ids)] = m
        return mx.array(toks), mx.array(mask)


def masked_ce(logits, targets, w):
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (ce * w).sum() / mx.maximum(w.sum(), 1.0)


def main():
    args = parse()
    ops.ensure_fast_blas()
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_reference as er

    t0 = time.time()
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(msg):
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        lines.append(line)

    log(f"args: {vars(args)}")
    from transformers import AutoTokenizer

    model, _ = load(args.base, dtype=mx.float32)
    assert model.has_mtp
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    corpus = rd.build_corpus(args.cache)
    held = er.token_stream(tokenizer, corpus["heldout"])
    ppl_before = None if args.no_ppl else er.perplexity(model, held, 256)
    if ppl_before:
        log(f"held-out perplexity before: {ppl_before:.2f} ({len(held):,} tokens)")

    old_vocab = model.args.vocab_size
    added = rd.add_tool_tokens(tokenizer)
    grow_vocab(model, len(tokenizer), args.seed)
    log(f"tokenizer: +{added} tool tokens -> {len(tokenizer)}; vocab rows {old_vocab} -> {model.args.vocab_size}")

    data = tr.Data(corpus, tokenizer, args.seed)  # plain text + the corpus' chat turns in the new format
    tools = ToolData(tokenizer, args.examples, args.seed, args.tool_tokens, args.call_weight,
                      args.focus, args.focus_frac, args.value_weight, args.short_frac, args.think_weight,
                      args.drill_think, args.answer_weight)
    n_tok = sum(len(r[0]) for r in tools.rows)
    n_sup = sum(float((r[1] > 0).sum()) for r in tools.rows)
    log(f"tool conversations: {len(tools.rows)} ({n_tok:,} tokens, {n_sup:,.0f} supervised); "
        f"corpus plain {len(data.plain):,} chat {len(data.chat):,}")

    start = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
    model.freeze(keys=["e_score_correction_bias"])
    optimizer = optim.AdamW(learning_rate=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state = [model.state, optimizer.state]

    def loss_fn(tool_toks, tool_mask, plain_toks):
        logits, mtp_logits, kl_t, _ = ops.forward(model, tool_toks, True)
        t_ce = masked_ce(logits[:, :-1], tool_toks[:, 1:], tool_mask[:, 1:])
        t_mtp = masked_ce(mtp_logits[:, :-1], tool_toks[:, 2:], tool_mask[:, 2:])
        logits, mtp_logits, kl_p, _ = ops.forward(model, plain_toks, True)
        p_ce = tr.cross_entropy(logits[:, :-1], plain_toks[:, 1:])
        p_mtp = tr.cross_entropy(mtp_logits[:, :-1], plain_toks[:, 2:])
        loss = t_ce + p_ce + args.mtp_weight * (t_mtp + p_mtp) + args.kl_weight * (kl_t + kl_p)
        return loss, (t_ce, t_mtp, p_ce, p_mtp)

    def step(tool_toks, tool_mask, plain_toks, lr):
        (_, aux), grads = nn.value_and_grad(model, loss_fn)(tool_toks, tool_mask, plain_toks)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.learning_rate = lr
        optimizer.update(model, grads)
        return aux

    windows = data.heldout_windows(args.seq + 1, 24)
    log(f"held-out loss at start {tr.heldout_loss(model, windows):.3f}")
    t_train, seen = time.time(), 0
    acc = np.zeros(4)
    n_acc = 0
    for it in range(args.steps):
        tt, tm = tools.batch()
        pt = data.batch(args.batch, args.seq, args.chat_frac)
        aux = step(tt, tm, pt, mx.array(tr.lr_at(it, args)))
        mx.eval(state, *aux)
        acc += [a.item() for a in aux]
        n_acc += 1
        seen += tt.size + pt.size
        if (it + 1) % 10 == 0 or it == 0:
            a = acc / n_acc
            log(f"step {it + 1:4d} tool {a[0]:.3f} tool-mtp {a[1]:.3f} text {a[2]:.3f} text-mtp {a[3]:.3f} "
                f"lr {tr.lr_at(it, args):.2e} {seen / (time.time() - t_train):,.0f} tok/s")
            acc[:] = 0
            n_acc = 0
        if (it + 1) % args.eval_every == 0 or it + 1 == args.steps:
            log(f"step {it + 1:4d} held-out loss {tr.heldout_loss(model, windows):.3f}")
    train_time = time.time() - t_train
    log(f"training time {train_time:.0f}s ({train_time / 60:.1f} min), {seen:,} tokens")

    if args.blend != 1.0:
        blend(model, start, args.blend)
        log(f"blended: start + {args.blend} x (trained - start)")
    if not args.no_ppl:
        ppl_after = er.perplexity(model, held, 256)
        log(f"held-out perplexity after: {ppl_after:.2f} (before {ppl_before:.2f}, {100 * (ppl_after / ppl_before - 1):+.1f}%)")

    config = json.loads((args.base / "config.json").read_text())
    config["vocab_size"] = model.args.vocab_size
    if args.out.resolve() != args.base.resolve():
        for name in ("training_log.txt", "training_history.json"):
            if (args.base / name).exists():
                shutil.copy(args.base / name, args.out / name)
    tr.save(model, config, args.out)
    rd.save_tokenizer(tokenizer, args.out)
    log(f"saved {args.out}; total {time.time() - t0:.0f}s")
    (args.out / "tools_training_log.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
