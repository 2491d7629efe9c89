"""Tokenizing a long conversation once, not every turn.

An agent re-sends its whole conversation every turn and the server renders and tokenizes it again:
on a 100K-token conversation that is about 0.1 s of every turn's time to first token (HF's fast
tokenizer, ~1 ms per 1K tokens on this machine). The next turn's rendered text starts with most of
this turn's, so `TokenCache` keeps the last renders' ids and tokenizes only what follows the longest
shared prefix, cut where a role marker (<|user|>, <|assistant|>, ...) starts. Role markers are added
tokens: the tokenizer splits them out of the text before BPE, so no token spans the cut and the ids
before it are exactly those of encoding the whole text (tested against whole encodes).

Prefixes are found as the prefix cache finds blocks: a hash chain over the segments between markers
(O(text) per render), each hit checked against the cached text itself.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict

ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class TokenCache:
    def __init__(self, tokenizer, size: int = 16):
        """tokenizer: mlx-lm's TokenizerWrapper or a HF fast tokenizer. size: renders kept (a server's
        live conversations)."""
        self.hf = getattr(tokenizer, "_tokenizer", tokenizer)
        added = {t.content for t in getattr(self.hf, "added_tokens_decoder", {}).values()}
        markers = [m for m in ROLE_MARKERS if m in added]
        # Cuts need token offsets, which only fast (Rust) tokenizers give; a slow one encodes whole.
        fast = getattr(self.hf, "is_fast", False)
        self.marker_re = re.compile("|".join(map(re.escape, markers))) if markers and fast else None
        self.size = size
        self.renders: OrderedDict[int, tuple[str, list[int]]] = OrderedDict()  # serial -> (text, ids), LRU last
        self.index: dict[int, tuple[int, int, int]] = {}  # chain hash -> (serial, char cut, token cut)
        self.serial = 0
        self.lock = threading.Lock()  # handler threads share it

    def _chain(self, text: str) -> list[tuple[int, int]]:
        """[(hash of text[:cut], cut)] for every role marker's start past 0."""
        out, h, last = [], 0, 0
        for m in self.marker_re.finditer(text):
            if m.start() > 0:
                h = hash((h, text[last : m.start()]))
                last = m.start()
                out.append((h, last))
        return out

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids of text, and the start offset of each token."""
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [s for s, _ in enc["offset_mapping"]]

    def encode(self, text: str) -> list[int]:
        if self.marker_re is None:
            return list(self.hf.encode(text, add_special_tokens=False))
        chain = self._chain(text)
        base_char, base_ids = 0, []
        with self.lock:
            for h, cut in reversed(chain):
                hit = self.index.get(h)
                if hit is not None and hit[1] == cut:
                    cached, ids = self.renders[hit[0]]
                    if cached[:cut] == text[:cut]:
                        base_char, base_ids = cut, ids[: hit[2]]
                        self.renders.move_to_end(hit[0])
                        break
        tail, starts = self._encode(text[base_char:])
        ids = base_ids + tail
        first_at = {}  # char offset (whole text) -> index of the token starting there
        for i, s in enumerate(starts):
            first_at.setdefault(base_char + s, len(base_ids) + i)
        with self.lock:
            self.serial += 1
            self.renders[self.serial] = (text, ids)
            for h, cut in chain:
                if cut >= base_char and cut in first_at:
                    self.index[h] = (self.serial, cut, first_at[cut])
                elif cut < base_char and h in self.index:
                    self.index[h] = (self.serial, cut, self.index[h][2])  # the newest render holds it too
            while len(self.renders) > self.size:
                old, _ = self.renders.popitem(last=False)
                for h in [h for h, v in self.index.items() if v[0] == old]:
                    del self.index[h]
        return ids


_caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The ids of a rendered prompt (no special tokens added), reusing earlier renders' ids."""
    with _caches_lock:
        try:
            cache = _caches.get(tokenizer)
            if cache is None:
                cache = _caches[tokenizer] = TokenCache(tokenizer)
        except TypeError:  # not weak-referenceable: no cache
            return list(tokenizer.encode(text, add_special_tokens=False))
    return cache.encode(text)
