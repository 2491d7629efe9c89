"""Typed access to a JSON request body: wrong types and out-of-range numbers are 400s naming the
parameter.

Which fields are honoured, which are accepted and knowingly ignored, and which are refused is the
table in docs/api_fields.md. A key this server does not know is accepted and ignored (logged once per
field at debug level): clients add fields faster than servers learn them, and a 400 for a field we do
not know breaks an agent for nothing. A known field whose value would change the result in a way that
cannot be done here is refused by the API adapter, naming it.
"""

from __future__ import annotations

import logging
import math

from .prompt import BadRequest

_MISSING = object()


def json_depth(value) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


log = logging.getLogger("glm_mlx.serve")
_logged: set[tuple[str, str]] = set()  # (endpoint, field) pairs already logged


def note_ignored(endpoint: str, keys) -> None:
    """Log each ignored field once per endpoint (debug level): a long-running agent sends the same
    fields with every request."""
    for key in sorted(keys):
        if (endpoint, key) not in _logged:
            _logged.add((endpoint, key))
            log.debug("%s: field %r accepted and ignored (it cannot change the output here)", endpoint, key)


class Fields:
    """`honoured`: the fields this endpoint reads. Every other key is accepted and ignored (see the
    module docstring), logged once per field."""

    def __init__(self, body, honoured: set[str], endpoint: str = ""):
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        self.body = body
        note_ignored(endpoint, set(body) - honoured)

    def has(self, key: str) -> bool:
        return self.body.get(key) is not None

    def raw(self, key: str, default=None):
        v = self.body.get(key)
        return default if v is None else v

    def typed(self, key: str, types: tuple, what: str, default=None, required: bool = False):
        v = self.body.get(key, _MISSING)
        if v is _MISSING or v is None:
            if required:
                raise BadRequest(f"'{key}' is required", key)
            return default
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise BadRequest(f"'{key}' must be {what}, got {type(v).__name__}", key)
        return v

    def boolean(self, key: str, default: bool) -> bool:
        return self.typed(key, (bool,), "a boolean (true/false)", default)

    def string(self, key: str, default=None, required: bool = False):
        return self.typed(key, (str,), "a string", default, required)

    def number(self, key: str, default, lo: float, hi: float, integer: bool = False, required: bool = False):
        v = self.typed(key, (int,) if integer else (int, float), "an integer" if integer else "a number",
                       default, required)
        if v is default:
            return v
        # Range first: math.isfinite() raises OverflowError on an integer beyond float range (JSON allows
        # 1e400 written out as digits); NaN fails the comparison and +-inf is out of range anyway.
        if not lo <= v <= hi or not math.isfinite(v):
            raise BadRequest(f"'{key}' must be in [{lo}, {hi}], got {v}", key)
        return int(v) if integer else float(v)

    def stop_strings(self, key: str, most: int = 16) -> list[str]:
        v = self.body.get(key)
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > most:
            raise BadRequest(f"'{key}' must be a string or a list of at most {most} strings", key)
        return [s for s in v if s]

    def logit_bias(self, key: str, vocab_size: int) -> dict | None:
        v = self.body.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise BadRequest(f"'{key}' must map token ids to numbers", key)
        out = {}
        for k, b in v.items():
            try:
                tok = int(k)
            except (TypeError, ValueError):
                raise BadRequest(f"'{key}' keys must be token ids, got {k!r}", key) from None
            if not 0 <= tok < vocab_size:
                raise BadRequest(f"'{key}': token id {tok} is outside the vocabulary (0..{vocab_size - 1})", key)
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise BadRequest(f"'{key}': bias for {tok} must be a number in [-100, 100]", key)
            out[tok] = float(b)
        return out
