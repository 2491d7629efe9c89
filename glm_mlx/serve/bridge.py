"""Between the event loop and the worker thread: a job's events relayed into an API's responder.

The API adapters (openai_api, anthropic_api, responses_output) turn a job's events into payloads as
plain synchronous generators; the worker thread owns every MLX array and speaks through a job's
thread-safe queue. A relay thread per running request (bounded: one per queued or running job) pulls
the job's events through the adapter and hands the finished SSE chunks (or the whole response) to the
event loop with `call_soon_threadsafe`. The loop never blocks on the worker, and an idle or slow
connection holds no thread at all.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from .stream import PING
from .worker import Failed, Finished


class ClientGone(Exception):
    """The request was cancelled (its client disconnected) while its events were relayed."""


_DONE = object()


def relay(job, keepalive: float, pings: bool, seen: dict):
    """The job's events (a relay thread); PING after `keepalive` seconds without one when `pings`.
    seen["end"] is set to the Finished or Failed that ends it (for the access log and metrics)."""
    last = time.monotonic()
    while True:
        try:
            ev = job.events.get(timeout=0.05)
        except queue.Empty:
            ev = None
        if ev is None:
            if job.cancelled.is_set():
                raise ClientGone
            now = time.monotonic()
            if pings and now - last >= keepalive:
                last = now
                yield PING
            continue
        last = time.monotonic()
        if job.cancelled.is_set() or isinstance(ev, Finished) and ev.reason == "cancelled":
            raise ClientGone  # (a cancelled job's Finished is nobody's answer)
        if isinstance(ev, (Finished, Failed)):
            seen["end"] = ev
            yield ev
            return
        if "first" not in seen:
            seen["first"] = time.perf_counter()
        yield ev


class Bridge:
    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="glm-mlx-relay")

    async def stream(self, job, produce):
        """Async iterator of the byte chunks `produce()` (a sync generator of str) makes in a relay
        thread. Leaving early (the client disconnected: the server cancels the response) cancels the job."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()

        def put(item):
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, item)
            except RuntimeError:  # the loop is closed: the server is gone
                job.cancel()

        def run():
            try:
                for chunk in produce():
                    put(chunk)
            except ClientGone:
                pass
            except BaseException as e:  # noqa: BLE001 - a bug in an adapter: logged, the stream ends unfinished
                traceback.print_exc(file=sys.stderr)
                put(e)
            finally:
                put(_DONE)

        loop.run_in_executor(self.pool, run)
        try:
            while True:
                item = await chunks.get()
                if item is _DONE or isinstance(item, BaseException):
                    return  # an adapter's failure: no closing event, so the answer does not look finished
                yield item.encode()
        finally:
            job.cancel()  # a no-op once the job ended

    async def whole(self, request, job, build):
        """`build()` (sync, in a relay thread) -> its result; the job is cancelled if the client goes
        away meanwhile (ClientGone is raised then)."""
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self.pool, build)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
        try:
            return await done
        finally:
            watcher.cancel()
            job.cancel()

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


async def _cancel_on_disconnect(request, job):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return
        await asyncio.sleep(0.05)  # (a late body part: not expected once the body was read)
