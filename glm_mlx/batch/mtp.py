"""MTP speculative decoding inside a running batch, with per-sequence acceptance (BatchEngine's mixin).

Each pass verifies every member's [last token, draft] in one main-model pass ([B, 2]); a member whose
draft is accepted (greedy: it is the argmax; sampled: speculative-sampling verification with its own
sampler) emits two tokens, the others one and drop the draft's cache row. The MTP layer then writes
each member's slots and drafts for the next pass in the same graph (one host sync per pass).

Whether a pass of B sequences should verify drafts at all is measured, not assumed: verifying 2B
tokens costs more than B (on a CPU the work grows with the rows; on a Mac a batch's second tokens
pick more experts), a plain pass is pipelined (batch.py) and an MTP pass is not, and a batch's pass
gains 1 + acceptance tokens per member. `ModeChooser` fits each mode's pass time against the batch
size and takes the faster, trying the other now and then, so the choice follows the machine, the
model and the acceptance of the requests at hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from ..generation.sampling import verify_drafts

if TYPE_CHECKING:
    from .sequence import Sequence


class ModeChooser:
    """Chooses, per pass, MTP passes or plain passes for a batch of B, from what passes measured.

    Per mode it fits a pass's time as a line in B (a fixed cost plus a cost per member) and keeps the
    tokens a member gains per pass (1 + acceptance for MTP passes): a running batch changes size at
    every arrival and departure, so each size alone would be measured too rarely to choose by. The
    predicted tokens per second decide; an unmeasured mode is tried first (MTP, then plain), and the
    slower one every `probe` passes. ema: the weight of the newest pass in the averages."""

    def __init__(self, probe: int = 32, ema: float = 0.1):
        self.probe, self.ema, self.passes = probe, ema, 0
        self.sums: dict[bool, list[float]] = {}  # mode -> decayed [n, sum B, sum t, sum B^2, sum B t, sum tokens/B]

    def _fit(self, mtp: bool) -> tuple[float, float, float | None]:
        """(mean B, mean time, time per member or None where one size only was measured)."""
        n, sb, st, sbb, sbt, _ = self.sums[mtp]
        mean_b, mean_t = sb / n, st / n
        var = sbb / n - mean_b ** 2
        return mean_b, mean_t, (max(0.0, (sbt / n - mean_b * mean_t) / var) if var > 1e-3 else None)

    def seconds(self, mtp: bool, batch: int) -> float:
        """A pass's predicted time. Where one size only was measured, the cost per member comes from the
        other mode's fit, per row (an MTP pass runs two rows per member, a plain pass one), else 0."""
        mean_b, mean_t, slope = self._fit(mtp)
        if slope is None:
            other = self._fit(not mtp)[2] if (not mtp) in self.sums else None
            slope = 0.0 if other is None else other * (2.0 if mtp else 0.5)
        return max(1e-9, mean_t + slope * (batch - mean_b))

    def rate(self, mtp: bool, batch: int) -> float:
        """Predicted tokens per second of a pass of `batch` members."""
        return batch * (self.sums[mtp][5] / self.sums[mtp][0]) / self.seconds(mtp, batch)

    def choose(self, batch: int) -> bool:
        if True not in self.sums or False not in self.sums:
            return True not in self.sums
        self.passes += 1
        best = self.rate(True, batch) >= self.rate(False, batch)
        return (not best) if self.passes % self.probe == 0 else best

    def record(self, mtp: bool, batch: int, tokens: int, seconds: float):
        if seconds <= 0 or batch <= 0:
            return
        old = self.sums.get(mtp)
        new = [1.0, batch, seconds, batch * batch, batch * seconds, tokens / batch]
        keep = 1 - self.ema
        self.sums[mtp] = new if old is None else [keep * o + x for o, x in zip(old, new)]


class MTPBatching:
    @staticmethod
    def _drafts(seq: "Sequence") -> bool:
        """Whether a member drafts in a batch: MTP on, no logits processors (they need the host history
        per drafted position), no logprobs (they come from plain decoding). Others take one token per
        step from their own sampler."""
        e = seq.engine
        return e.mtp and not e.sampler.processors and e.logprobs is None

    def _sample_drafts(self, decoding: list["Sequence"], logits: mx.array) -> mx.array:
        """[B, V] MTP logits -> each member's draft [B]: greedy members' argmax in one op, sampled drafting
        ones from their own sampler (the distribution verification compares against). A member that
        does not draft gets a filler (its sampler's random numbers are for its own tokens)."""
        drafts = mx.argmax(logits, axis=-1).astype(mx.int32)
        rows = [b for b, s in enumerate(decoding) if self._drafts(s) and not s.engine.sampler.params.greedy]
        if not rows:
            return drafts
        sampled = {b: decoding[b].engine.sampler.sample(logits[b : b + 1]).astype(mx.int32) for b in rows}
        return mx.concatenate([sampled[b] if b in sampled else drafts[b : b + 1] for b in range(len(decoding))])

    def _mtp_step(self, decoding: list["Sequence"]):
        """One MTP pass for the batch, each sequence accepting its own draft: every row verifies [its last
        token, its draft] in one main-model pass ([B, 2]); a row whose draft is accepted (greedy: it is
        the argmax; sampled: speculative-sampling verification) emits two tokens, the others one and
        drop the draft's cache row. The MTP layer then writes each row's slots and drafts from the row
        that pairs h with the token to verify next, so the next pass needs no draft step."""
        g, model = self.group, self.model
        B = len(decoding)
        y = mx.array([s.generated[-1] for s in decoding], dtype=mx.int32)  # [B]
        d = g.drafts
        logits, hidden = model(mx.stack([y, d], axis=1), cache=g.layers, return_hidden=True)  # [B, 2, V], [B, 2, hidden]
        for s in decoding:
            s.pc.tokens.append(s.generated[-1])
        greedy = mx.argmax(logits, axis=-1).astype(mx.int32)  # [B, 2]
        drafting = [self._drafts(s) for s in decoding]
        # Per row: [accepted, the token after y, the token after the draft]. Greedy drafting rows share
        # the argmax; sampled ones verify with their own sampler; the rest sample once and never accept.
        verdict, lps = {}, {}
        for b, s in enumerate(decoding):
            if not drafting[b]:
                tok, lp = self._sample(s, logits[b, :1])
                verdict[b] = mx.concatenate([mx.zeros(1, mx.int32), tok.astype(mx.int32), tok.astype(mx.int32)])
                if lp is not None:
                    lps[b] = lp
            elif not s.engine.sampler.params.greedy:
                ok, corr, bonus = verify_drafts(s.engine.sampler, logits[b], g.draft_logits[b : b + 1], d[b : b + 1])
                verdict[b] = mx.stack([ok, mx.where(ok == 1, d[b], corr), bonus])
        table = mx.stack([(greedy[:, 0] == d).astype(mx.int32), greedy[:, 0], greedy[:, 1]], axis=1)  # [B, 3]
        if verdict:
            table = mx.stack([verdict[b] if b in verdict else table[b] for b in range(B)])
        acc, first, second = table[:, 0] == 1, table[:, 1], table[:, 2]  # [B] each
        # MTP slots: h at y pairs with the token after it, h at the draft with the token after that
        # (a rejected row's second slot is filler, trimmed below); draft from the row that pairs with
        # the token to verify next.
        pair = mx.where(acc[:, None], mx.stack([d, second], axis=1), mx.stack([first, first], axis=1))  # [B, 2]
        h2 = model.mtp_hidden(hidden, pair, cache=g.mtp)  # [B, 2, hidden]
        row = acc.astype(mx.int32)[:, None, None]  # [B, 1, 1]: 1 where accepted
        g.draft_logits = model.lm_head(mx.take_along_axis(h2, row, axis=1)[:, 0])  # [B, V]
        g.drafts = self._sample_drafts(decoding, g.draft_logits)
        g.pending, g.ahead = mx.take_along_axis(hidden, row, axis=1), True  # [B, 1, hidden]
        mx.eval(table, g.drafts, g.draft_logits, g.pending, *lps.values(), *g.arrays())
        table, drafts = table.tolist(), d.tolist()
        out = []
        for b, s in enumerate(decoding):
            accepted, nxt, after = table[b]
            s.stats.main_passes += 1
            if drafting[b]:
                s.stats.drafted += 1
                s.stats.accepted += accepted
            if accepted:
                s.pc.tokens.append(drafts[b])
                out.append(self._emit(s, drafts[b], None))
                if len(s.generated) < s.max_tokens:  # at max_tokens the caller ends the sequence here
                    out.append(self._emit(s, after, None))
            else:
                for layer in g.layers + [g.mtp]:
                    layer.trim(b, 1)
                out.append(self._emit(s, nxt, lps[b][0].tolist() if b in lps else None))
        return out

    def _set_mode(self, decoding: list["Sequence"], mtp: bool):
        """Switch the running group between plain passes and MTP passes in place: to MTP, the MTP layer
        writes the slots plain passes left, then each member's slot for its last token, and drafts
        (one [B, 1] MTP pass); back, each
        member's drafted-ahead slot is dropped."""
        g = self.group
        if mtp and not g.ahead:
            g.catch_up()  # the slots plain passes left
            y = mx.array([[s.generated[-1]] for s in decoding], dtype=mx.int32)  # [B, 1]
            h = self.model.mtp_hidden(g.pending, y, cache=g.mtp)  # [B, 1, hidden]
            g.draft_logits = self.model.lm_head(h[:, 0])  # [B, V]
            g.drafts, g.ahead = self._sample_drafts(decoding, g.draft_logits), True
        elif not mtp:
            g.settle()
