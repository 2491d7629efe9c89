"""The generation worker: one thread that owns the model, every MLX array and every prompt cache.

MLX arrays and streams belong to the thread that made them, so the model is loaded *in* this
thread and nothing MLX ever leaves it. HTTP handler threads submit a `Job` (token ids and
sampling settings, plain Python) and read plain-Python events back from the job's queue:
`Delta` per token, then one `Finished` or `Failed`. A handler cancels with `job.cancel()`; the
worker checks between prefill chunks and between decode steps.

Requests are batched continuously (glm_mlx.batch.engine): a job that arrives while others decode joins the
running batch at the next step, a long prompt prefills one chunk per step between decode steps,
and a finished job leaves at once.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..generation.sampling import SamplingParams


@dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; n: the chosen token's logprob and the n most likely
    # Constrained decoding (glm_mlx/grammar.py): an llguidance Lark grammar the output must match (masked
    # while decoding; such a request does not draft with MTP), and a cap on the reasoning's tokens after
    # which `</think>` is forced (the prompt ends inside <think>).
    grammar: str | None = None
    reasoning_budget: int | None = None


@dataclass
class Delta:
    text: str
    token: int
    logprobs: list | None  # [chosen logprob, n top ids, n top logprobs]
    cached_tokens: int | None = None  # on the first Delta: prompt tokens served from a cache


@dataclass
class Finished:
    reason: str  # "stop" (end-of-generation id), "stop_sequence", "length" or "cancelled"
    stop_sequence: str | None
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from a prompt cache
    completion_tokens: int
    ttft: float  # seconds from submission to the first token
    prompt_tps: float
    generation_tps: float
    disk_tokens: int = 0  # of cached_tokens, read back from the SSD prefix cache


@dataclass
class Failed:
    message: str
    status: int = 500  # for a request not answered yet: 503 when the server is shutting down


class Busy(Exception):
    """The queue is full (HTTP 503)."""


class Job:
    def __init__(self, request: GenRequest):
        self.request = request
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self):
        self.cancelled.set()


class CachePool:
    """A few prompt caches; a request continues the idle one sharing the longest prefix with its prompt
    (else a fresh one, evicting the least recently used idle one). A cache in use by a running
    sequence is never handed out twice. Lives in the worker thread only."""

    def __init__(self, model, mtp: bool, size: int = 4, share_heads: bool = True):
        """share_heads: with no slot free, trim another conversation's cache to the head it shares with a
        new prompt (e.g. the system prompt) rather than prefill that head again. Off where a prefix
        cache serves shared heads: the least recently used idle cache goes instead, and the live
        conversation keeps its cache."""
        self.model, self.mtp, self.size, self.share_heads = model, mtp, size, share_heads
        self.caches: list = []  # idle, least recently used first
        self.busy: list = []
        self.prompt_len: dict[int, int] = {}  # id(idle cache) -> length of the prompt it last served

    def match(self, ids: list[int]):
        """-> (the idle cache to continue, tokens of `ids` it holds), or (None, 0). Nothing is taken yet:
        the caller may still prefer the prefix cache, and then no conversation was evicted for it."""
        from ..generation.prompt_cache import common_prefix

        n, best = max(((common_prefix(pc.tokens, ids), pc) for pc in self.caches), key=lambda x: x[0], default=(0, None))
        if best is not None and not all(c.can_trim_to(min(n, len(ids) - 1)) for c in best.cache):
            n = 0  # a recurrent state (GLM-5.3-Flash's KDA layers) cannot go back there: reuse would start over
        room = len(self.caches) + len(self.busy) < self.size or not self.share_heads
        # Continue a conversation: the cache's tokens all prefix this prompt; or this prompt extends the
        # prompt the cache last served, its reply coming back rendered otherwise (reasoning cleared from
        # the history, a tool call re-rendered), so only the reply's rows go; or the cache holds the
        # prompt whole (a retry). Trim another conversation's cache to a shared head (e.g. the system
        # prompt) only when no slot is free and no prefix cache holds the head (share_heads).
        if n > 0 and (n >= len(best.tokens) - 1 or n >= self.prompt_len.get(id(best), len(ids)) - 1
                      or n >= len(ids) - 1 or not room):
            return best, n
        return None, 0

    def take(self, pc):
        """An idle cache `match` chose, now in use."""
        self.caches.remove(pc)
        self.prompt_len.pop(id(pc), None)  # release sets it again
        self.busy.append(pc)
        return pc

    def fresh(self):
        """A new empty cache, in use (the least recently used idle ones make room)."""
        from ..generation.prompt_cache import PromptCache

        return self.adopt(PromptCache.fresh(self.model, mtp=self.mtp))

    def adopt(self, pc):
        """A cache built elsewhere (restored from the prefix cache) joins the pool, in use."""
        while self.caches and len(self.caches) + len(self.busy) >= self.size:
            self._drop(self.caches[0])
        self.busy.append(pc)
        return pc

    def _drop(self, pc):
        """Evict an idle cache (its id may be reused by a later object: its entry goes too)."""
        self.caches.remove(pc)
        self.prompt_len.pop(id(pc), None)

    def release(self, pc, prompt_len: int, keep: bool = True):
        """prompt_len: the prompt the cache just served (its tokens past that are the reply)."""
        if pc in self.busy:
            self.busy.remove(pc)
        if not keep:
            return
        self.caches.append(pc)
        self.prompt_len[id(pc)] = prompt_len
        while len(self.caches) > self.size:
            self._drop(self.caches[0])


@dataclass
class _Running:
    seq: object  # batch.Sequence
    text: object  # generate.TextStream
    ttft: float | None = None
    disk_tokens: int = 0
    emitted: int = 0  # tokens passed on (a batched MTP step may produce two; the second may come after the end)


def _free_streams():
    """MLX keeps a thread's streams until process exit, and destroying them then aborts the process now
    and then ("terminate called without an active exception"): the worker frees its own on the way out."""
    import mlx.core as mx

    mx.synchronize()
    mx.clear_streams()


class Worker(threading.Thread):
    """`loader()` runs in this thread and returns (model, tokenizer)."""

    def __init__(self, loader, *, mtp: bool = True, num_draft: int = 1, prefill_step: int = 2048,
                 cache_slots: int = 4, max_queue: int = 64, max_batch: int = 8, prefix_cache=None,
                 prefill_budget: int | None = 512):
        """prefix_cache: None, or `make(model) -> glm_mlx.prefix.cache.PrefixCache`, called in this thread.
        The loader may still set `max_batch` (from what fits beside the model it loaded)."""
        super().__init__(name="glm-mlx-worker", daemon=True)
        self.make_prefix, self.prefix = prefix_cache, None
        self.prefill_budget = prefill_budget
        self.loader, self.mtp, self.num_draft, self.prefill_step = loader, mtp, num_draft, prefill_step
        self.cache_slots, self.max_queue, self.max_batch = cache_slots, max_queue, max_batch
        self.jobs: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.model = self.tokenizer = None
        self.running: dict[Job, _Running] = {}
        self.unsaved: list[Job] = []  # running jobs whose prompt blocks are not yet in the prefix cache

    # --- handler side ---------------------------------------------------------------------
    def wait_ready(self):
        """Block until the model is loaded; re-raise the loader's exception."""
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def submit(self, request: GenRequest) -> Job:
        if self.jobs.qsize() >= self.max_queue:
            raise Busy(f"{self.jobs.qsize()} requests are waiting; try again shortly")
        job = Job(request)
        self.jobs.put(job)
        return job

    def stop(self, reason: str = "the server is shutting down"):
        """Stop after the current step. Requests still running or waiting end with Failed(reason, 503):
        their clients get an explicit error, never an answer that looks finished."""
        self.stop_reason = reason
        self.jobs.put(None)

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    # --- worker side ----------------------------------------------------------------------
    def run(self):
        from ..batch.engine import BatchEngine

        try:
            self.model, self.tokenizer = self.loader()
            self.pool = CachePool(self.model, self.mtp, max(self.cache_slots, self.max_batch),
                                  share_heads=self.make_prefix is None)
            # A pipeline over several Macs replays single-sequence calls only: no batching there.
            self.batch = BatchEngine(self.model, 1 if hasattr(self.model, "on_generate") else self.max_batch,
                                     self.prefill_budget)
            if self.make_prefix is not None:
                self.prefix = self.make_prefix(self.model)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait_ready
            self.load_error = e
            _free_streams()
            self.ready.set()
            return
        self.ready.set()
        try:
            self._serve()
        finally:
            why = getattr(self, "stop_reason", None) or "the server stopped"
            for job in list(self.running):
                if job.cancelled.is_set():
                    self._finish(job, "cancelled")
                else:
                    self._finish(job, "error")
                    job.events.put(Failed(why, 503))
            while True:  # admitted by nobody: each waiting request is told
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.events.put(Failed(why, 503))
            if self.prefix is not None:
                self.prefix.close()  # the RAM tier goes to disk: a restart finds it
            _free_streams()

    def _serve(self):
        while True:
            if not self.running:  # idle: block for work
                job = self.jobs.get()
                if job is None:
                    return
                self._admit(job)
            while not self.batch.full:  # join the running batch at this step
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                self._admit(job)
            for job in [j for j in self.running if j.cancelled.is_set()]:
                self._finish(job, "cancelled")
            if self.running:
                self._step()
            self._publish()

    def _publish(self, every: float = 0.5):
        """Plain numbers for the status page and /metrics (read from other threads; nothing MLX leaves)."""
        now = time.monotonic()
        if now - getattr(self, "_published_at", 0.0) < every and self.running:
            return
        import mlx.core as mx

        self._published_at = now
        rows = []
        for job, run in list(self.running.items()):
            st = run.seq.stats
            rows.append({"prompt_tokens": len(run.seq.prompt), "generated": run.emitted,
                         "prefilling": run.seq.prefilling, "ttft": run.ttft,
                         "tok_s": round((run.emitted - 1) / st.gen_time, 1) if st.gen_time and run.emitted > 1 else None,
                         "age_s": round(time.perf_counter() - job.submitted, 1)})
        self.published = {"active_memory": mx.get_active_memory(), "peak_memory": mx.get_peak_memory(),
                          "running": rows, "at": time.time()}

    def _admit(self, job: Job):
        from ..generation.engine import Engine
        from ..generation.text import TextStream

        req = job.request
        if job.cancelled.is_set():
            job.events.put(Finished("cancelled", None, len(req.prompt), 0, 0, 0.0, 0.0, 0.0))
            return
        # A seeded sampled request decodes plainly: MTP's drafts and verification draw other random
        # numbers than plain steps, and whether it runs alone (MTP) or in a batch must not matter.
        seeded = req.sampling.seed is not None and not req.sampling.greedy
        # defer_mtp: a prompt's MTP slots are written after its first token is out (_save_prefix, or when
        # it joins a batch), not on its time to first token.
        # A grammar's matcher follows the tokens as they come: MTP's drafts would need its rollback per draft.
        engine = Engine(self.model, req.sampling, mtp=self.mtp and not seeded and req.grammar is None,
                        num_draft=self.num_draft, prefill_step=self.prefill_step, logprobs=req.logprobs,
                        defer_mtp=True)
        if req.grammar is not None or req.reasoning_budget is not None:
            from ..generation.constrain import processors

            try:  # handlers validated the grammar; compiled ones are cached by their text
                engine.sampler.processors.extend(processors(self.tokenizer, self.model, len(req.prompt),
                                                            req.grammar, req.reasoning_budget))
            except Exception as e:  # noqa: BLE001 - this request fails; the server keeps serving
                job.events.put(Failed(f"the grammar cannot be enforced: {e}"))
                return
        pc, disk = self._cache_for(req.prompt)
        seq = self.batch.add(job, req.prompt, pc, engine, req.max_tokens)
        self.running[job] = _Running(seq, TextStream(self.model, self.tokenizer, req.max_tokens, req.stop),
                                     disk_tokens=disk)

    def _cache_for(self, prompt: list[int]):
        """(prompt cache, tokens of it read from disk): a live conversation's cache, or the prefix
        cache's blocks when they cover more of the prompt."""
        pc, held = self.pool.match(prompt)
        if self.prefix is not None and self.prefix.lookup(prompt) - 1 > min(held, len(prompt) - 1):
            restored, st = self.prefix.restore(prompt)
            if restored is not None:
                return self.pool.adopt(restored), st.get("disk_tokens", 0)
        pc = self.pool.take(pc) if pc is not None else self.pool.fresh()
        if self.prefix is not None:
            self.prefix.track(pc, prompt)  # recurrent layers keep their states where its blocks will carry them
        return pc, 0

    def _save_prefix(self, pc):
        if self.prefix is not None:
            from ..generation.engine import catch_up_mtp

            catch_up_mtp(self.model, pc)  # blocks need their MTP slots (a prefill defers them)
            try:
                self.prefix.save(pc)
            except Exception:  # noqa: BLE001 - a full disk or the like must not fail the request
                traceback.print_exc(file=sys.stderr)

    def _step(self):
        try:
            # First tokens go out as soon as their prefill ends, before the others' decode step.
            emitted = self.batch.step(first_tokens=self._emit)
        except Exception as e:  # noqa: BLE001 - reported to the clients; the server keeps serving
            traceback.print_exc(file=sys.stderr)
            self.batch.discard_group()
            for job in list(self.running):  # caches interrupted mid-step may not hold what their tokens say
                self._finish(job, "error", keep_cache=False)
                job.events.put(Failed(f"{type(e).__name__}: {e}"))
            return
        self._emit(emitted)
        # Prompts' blocks go to the prefix cache (for other sessions) once no prompt waits for its first
        # token: copying them out is not on anyone's time to first token.
        if self.unsaved and not any(s.prefilling for s in self.batch.seqs) and self.jobs.empty():
            for job in [j for j in self.unsaved if j in self.running]:
                self._save_prefix(self.batch.cache_of(job))  # a decoding sequence's rows are in the batch
            self.unsaved.clear()

    def _emit(self, emitted):
        for job, tok, lp in emitted:
            run = self.running.get(job)
            if run is None:  # it ended at the previous token of this step (a stop string or id)
                continue
            first = run.ttft is None
            if first:
                run.ttft = time.perf_counter() - job.submitted
            run.emitted += 1
            text, reason, hit = run.text.push(tok, run.emitted)
            job.events.put(Delta(text, tok, lp, run.seq.stats.reused_tokens if first else None))
            if reason is not None:
                self._finish(job, "stop_sequence" if hit is not None else reason, hit)
            elif first:
                self.unsaved.append(job)

    def _finish(self, job: Job, reason: str, stop_sequence: str | None = None, keep_cache: bool = True):
        run = self.running.pop(job)
        seq = self.batch.remove(job)
        if keep_cache:
            self._save_prefix(seq.pc)  # also a cancelled prefill's completed chunks
        self.pool.release(seq.pc, len(seq.prompt), keep=keep_cache)
        if reason == "error":
            return
        st = seq.stats
        n = run.emitted
        job.events.put(Finished(
            reason, stop_sequence, len(seq.prompt), st.reused_tokens, n, run.ttft or 0.0,
            st.prompt_tokens / st.prompt_time if st.prompt_time else 0.0,
            (n - 1) / st.gen_time if st.gen_time and n > 1 else 0.0, min(run.disk_tokens, st.reused_tokens)))
