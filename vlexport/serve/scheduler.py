"""One worker thread owns the bundle's ONNX Runtime sessions and decodes every request, in batches.

Continuous batching, per graph group:
- A request is prefilled alone (vision, embed, the decoder over its prompt, from its task's prefix pack), which
  gives its first token. Its KV cache then joins the running batch of its group between two decode steps.
- The rows of one batch have different lengths; the runtime's KV loop (Bundle.prefill into a running batch,
  Bundle.step, KvState.keep) holds them: left-padded caches on the portable decoder form, rows of one shared buffer
  on the ORT-native form. Every row keeps its own position.
- One decode step feeds every row of a group its last token. A group is the set of tasks that run the decoder with
  the same graph and the same fed weights: the base and every prefix-only task share one group (a prefix is only
  KV entries and positions, which are per row), while a task with bottleneck slot weights in the decoder or its
  own merged parts has a group of its own (the runtime feeds slot weights per graph run; per-row task weights are
  not in it yet).
- Rows leave when they finish (EOS, max_tokens, a stop sequence), time out, or are cancelled (a closed stream).

Admission is first come first served, with one bias: while a group has rows running, a queued request of that
group may overtake an older one of another group, at most `max_batch` times, so that groups fill up without
starving anyone.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..runtime import pick_token as pick  # Bundle.generate's sampling rule and random stream
from .protocol import ChatRequest


# -- events the worker sends to a request's sink ---------------------------------------------------------------
@dataclass
class Tokens:
    ids: list[int]
    text: str  # the text these tokens add (held back while it may be the start of a stop sequence)


@dataclass
class Done:
    finish_reason: str  # "stop" or "length"
    text: str
    token_ids: list[int]
    prompt_tokens: int
    timings: dict


@dataclass
class Failed:
    status: int
    message: str
    type: str
    code: str | None = None


class QueueFull(Exception):
    pass


class Stopped(Exception):
    pass


@dataclass
class Job:
    id: str
    request: ChatRequest
    sink: Callable[[object], None]  # called on the worker thread; must not block
    deadline: float  # time.monotonic()
    created: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    skips: int = 0  # times a younger request of a running group was admitted before it

    def cancel(self) -> None:
        self.cancelled.set()


class Row:
    """One request while it decodes: its tokens, its next position, and its text."""

    def __init__(self, job: Job, bundle, first_position: int):
        self.job, self.bundle = job, bundle
        r = job.request
        self.rng = np.random.default_rng(r.seed)
        self.ids: list[int] = []
        self.position = first_position  # position of the next token fed
        self.text = ""  # decoded so far (up to a stop sequence)
        self.sent = 0  # characters of text already sent
        self._prefix, self._read = 0, 0  # incremental detokenization offsets into ids
        self.first_token_at: float | None = None

    def _new_text(self) -> str:
        """The text the last token adds. Decoding a short window (the previous tokens and the new ones) keeps a
        step O(1); the window's previous part settles word-boundary spaces and multi-byte characters, the way
        text-generation-inference and vLLM do it."""
        before = self.bundle.decode(self.ids[self._prefix:self._read])
        after = self.bundle.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # U+FFFD: an incomplete UTF-8 sequence
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def _flush(self) -> str:
        """At the end: whatever the window still holds back (an incomplete character decodes as U+FFFD)."""
        before = self.bundle.decode(self.ids[self._prefix:self._read])
        return self.bundle.decode(self.ids[self._prefix:])[len(before):]

    def accept(self, logits: np.ndarray) -> str | None:
        """Pick the next token from this row's logits and send it; the finish reason when the row is done.

        A tail of the text that might still become a stop sequence is held back until the next token settles it;
        the stop sequence itself is never sent."""
        r = self.job.request
        token = pick(logits, r.temperature, r.top_p, self.rng)
        self.ids.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        start = len(self.text)
        self.text += self._new_text()
        finish = "stop" if token in self.bundle.eos_ids else None
        longest = max((len(s) for s in r.stop), default=0)
        cuts = [at for at in (self.text.find(s, max(0, start - len(s) + 1)) for s in r.stop) if at >= 0]
        if cuts:
            self.text, finish = self.text[:min(cuts)], "stop"
        elif finish is None and len(self.ids) >= r.max_tokens:
            finish = "length"
        if finish is not None and not cuts:
            self.text += self._flush()
        ready = len(self.text)
        if finish is None and longest:
            tail = self.text[max(self.sent, ready - longest + 1):]
            for k in range(len(tail), 0, -1):
                if any(s.startswith(tail[-k:]) for s in r.stop):
                    ready -= k
                    break
        delta = self.text[self.sent:ready]
        self.sent = max(self.sent, ready)
        self.job.sink(Tokens([token], delta))
        return finish


class Group:
    """The running rows of one decoder group and their batched KV state (runtime.KvState)."""

    def __init__(self):
        self.rows: list[Row] = []
        self.state = None

    def keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.state.keep(keep)


class Scheduler:
    def __init__(self, bundle, max_batch: int = 4, max_queue: int = 64, metrics=None, log=print):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be at least 1 and max_queue at least 0")
        self.bundle, self.max_batch, self.max_queue = bundle, max_batch, max_queue
        self.metrics, self.log = metrics, log
        self.queue: collections.deque[Job] = collections.deque()
        self.groups: dict[str, Group] = {}
        self.group_of = {task: bundle.decoder_group(task) for task in [None, *bundle.tasks]}
        self.cond = threading.Condition()
        self.stopping = False
        self.drain = True
        self.thread: threading.Thread | None = None

    # -- the request side (any thread) ------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="vlexport-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise Stopped("the server is shutting down")
            # Requests that the worker will start at once (free rows) do not count as waiting.
            if len(self.queue) >= self.max_queue + max(0, self.max_batch - self.active):
                raise QueueFull(f"the queue is full ({len(self.queue)} waiting, {self.active} decoding)")
            self.queue.append(job)
            self._gauge()
            self.cond.notify()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Finish what is running and queued (drain), or fail it; then end the worker."""
        with self.cond:
            self.stopping, self.drain = True, drain
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def active(self) -> int:
        return sum(len(g.rows) for g in self.groups.values())

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # -- the worker thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                self._expire_queued()
                if self.stopping and not self.drain:
                    for job in self.queue:
                        self._fail(job, 503, "the server stopped before this request ran", "server_shutdown")
                    self.queue.clear()
                    for g in self.groups.values():
                        for row in g.rows:
                            self._fail(row.job, 503, "the server stopped during this request", "server_shutdown")
                    self.groups.clear()
                if not self.queue and not self.active:
                    if self.stopping:
                        self._gauge()
                        return
                    self.cond.wait(0.5)
                    continue
                admit = self._admit()
                self._gauge()
            for job in admit:
                self._prefill(job)
            for key in list(self.groups):
                self._step(self.groups[key])
                if not self.groups[key].rows:
                    del self.groups[key]
            self._gauge()

    def _admit(self) -> list[Job]:
        """Queued requests to start now (called with the lock held)."""
        free = self.max_batch - self.active
        chosen: list[Job] = []
        while free > 0 and self.queue:
            running = set(self.groups) | {self.group_of[j.request.task] for j in chosen}
            oldest = self.queue[0]
            job = oldest
            if running and self.group_of[oldest.request.task] not in running and oldest.skips < self.max_batch:
                job = next((j for j in self.queue if self.group_of[j.request.task] in running), oldest)
            if job is not oldest:
                for j in self.queue:  # every older request was passed over once more
                    if j is job:
                        break
                    j.skips += 1
            self.queue.remove(job)
            chosen.append(job)
            free -= 1
        return chosen

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.queue if j.cancelled.is_set() or now > j.deadline]:
            self.queue.remove(job)
            if job.cancelled.is_set():
                self._count("cancelled")
            else:
                self._timeout(job)

    def _prefill(self, job: Job) -> None:
        b, r = self.bundle, job.request
        if job.cancelled.is_set():
            self._count("cancelled")
            return
        try:
            t0 = time.monotonic()
            features = b.image_features(r.pixels, r.task)
            n_image = r.prompt_ids.count(b.image_token_id)
            if n_image != features.shape[0]:
                raise RuntimeError(f"the prompt has {n_image} image tokens but the image gave {features.shape[0]} features")
            group = self.groups.setdefault(self.group_of[r.task], Group())
            # The row joins its group's batch as it is prefilled (a native buffer row is written in place; the
            # buffer starts with room for this prompt and doubles as rows need more); a row that ends on its first
            # token leaves again at once.
            state = b.prefill(r.prompt_ids, features, r.task, into=group.state, rows=self.max_batch)
            group.state = state
            if self.metrics:
                self.metrics.prefill_seconds.observe(time.monotonic() - t0)
            row = Row(job, b, int(state.positions[-1]))
            group.rows.append(row)
            finish = row.accept(state.logits[-1])
        except Exception as e:  # a bug, not the client's: fail this request, keep serving the others
            self.log(f"vlexport serve: request {job.id} failed in prefill: {e}\n{traceback.format_exc()}")
            group = self.groups.get(self.group_of.get(r.task))
            if group is not None and group.state is not None:  # the failed row leaves the batch, if it joined
                group.rows = [row for row in group.rows if row.job is not job]
                group.state.keep(list(range(len(group.rows))))
            self._fail(job, 500, f"internal error in prefill: {e}", "internal_error", type="server_error")
            return
        if finish is not None:
            group.keep([i for i, other in enumerate(group.rows) if other is not row])
            self._finish(row, finish)

    def _step(self, g: Group) -> None:
        now = time.monotonic()
        keep = []
        for i, row in enumerate(g.rows):
            if row.job.cancelled.is_set():
                self._count("cancelled")
            elif now > row.job.deadline:
                self._timeout(row.job)
            else:
                keep.append(i)
        g.keep(keep)
        if not g.rows:
            return
        b = self.bundle
        try:
            t0 = time.monotonic()
            logits = b.step(g.state, [row.ids[-1] for row in g.rows])
            if self.metrics:
                self.metrics.step_seconds.observe(time.monotonic() - t0)
                self.metrics.batch_rows.observe(len(g.rows))
            keep = []
            for i, row in enumerate(g.rows):
                row.position += 1
                finish = row.accept(logits[i])
                if finish is None:
                    keep.append(i)
                else:
                    self._finish(row, finish)
        except Exception as e:
            self.log(f"vlexport serve: a decode step of task {g.state.task!r} failed: {e}\n{traceback.format_exc()}")
            for row in g.rows:
                self._fail(row.job, 500, f"internal error in a decode step: {e}", "internal_error", type="server_error")
            keep = []
        g.keep(keep)

    # -- endings ----------------------------------------------------------------------------------------------
    def _finish(self, row: Row, reason: str) -> None:
        job, r = row.job, row.job.request
        now = time.monotonic()
        timings = {"total_s": now - job.created, "first_token_s": (row.first_token_at or now) - job.created}
        if self.metrics:
            self.metrics.finished(r.model, len(r.prompt_ids), len(row.ids), timings["total_s"], timings["first_token_s"])
        job.sink(Done(reason, row.text, list(row.ids), len(r.prompt_ids), timings))

    def _timeout(self, job: Job) -> None:
        self._count("timeout")
        job.sink(Failed(504, f"the request did not finish within the server's timeout of "
                             f"{job.deadline - job.created:.0f} s", "timeout", "timeout"))

    def _fail(self, job: Job, status: int, message: str, code: str, type: str = "server_error") -> None:
        self._count(code)
        job.sink(Failed(status, message, type, code))

    def _count(self, reason: str) -> None:
        if self.metrics:
            self.metrics.dropped.labels(reason=reason).inc()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self.queue))
            self.metrics.active_rows.set(self.active)
