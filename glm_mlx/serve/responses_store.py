"""What /v1/responses keeps between requests: a bounded in-memory LRU of past responses (their
conversation items, for `previous_response_id` and `item_reference`, and the response object, for
GET /v1/responses/{id}). Nothing is written to disk; a restart forgets every response."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Stored:
    response: dict  # the response object as it was sent
    items: list[dict]  # the conversation up to and including this response's output (Responses items)


class ResponseStore:
    """Thread-safe (handler threads share it); the least recently used response goes first."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Stored] = OrderedDict()

    def put(self, response: dict, items: list[dict]) -> None:
        with self._lock:
            self._entries[response["id"]] = Stored(response, items)
            self._entries.move_to_end(response["id"])
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is not None:
                self._entries.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._entries.pop(response_id, None) is not None

    def item(self, item_id: str) -> dict | None:
        """An item of any stored conversation by its id (item_reference), newest responses first."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in reversed(entries):
            for it in entry.items:
                if isinstance(it, dict) and it.get("id") == item_id:
                    return it
        return None

    def __len__(self) -> int:
        return len(self._entries)
