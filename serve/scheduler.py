"""The batching scheduler: one background thread decodes every waiting and running request together, token by token.

Design (why token-level joining): a request that arrives while others are being answered joins the
running batch at the next token step instead of waiting for the whole batch to end, so a short
question never waits behind a long answer and the batch stays full under load. It is clean here
because rows are right-aligned in one KV cache (serve/decoding.py): joining is a prefill plus a
copy, leaving is an index, and each row keeps its own positions 0..n-1.

- Admission is bounded: at most max_batch rows decode at once and max_queue more requests may wait
  (from the moment they are accepted, through reading their media, to their first token); one more
  is refused with QueueFull (the API's 429). So memory is bounded by max_batch + max_queue requests,
  each by the API's byte and frame limits, plus a KV cache of max_batch × the model's context.
- A request whose client went away (job.cancelled) is dropped before its next token: its row leaves
  the batch, and decoding stops when no row is left.
- Greedy answers are the engine's one-at-a-time answers (Engine.reply, eval.py --prompt): a joining
  prompt is prefilled alone, as Engine.reply prefills it, and each step attends to exactly the row's
  own tokens. Batched matmuls may round differently in the last bits than a batch of one, so only a
  near-tie between two tokens could differ; the tests compare answers token for token.
- Sampling (temperature > 0) draws from the row's own generator seeded with its seed, as Engine.reply
  seeds it, so the same request with the same seed gets the same answer, alone or in any batch, as
  long as its logits agree to the last bit (they do alone; in a batch, see above).

The scheduler thread is the only one touching the model's LM; media is read (and CLIP run) in the
requests' own threads before submit().
"""
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from dataset.vlm_dataset import VisualInputs
from model.engine import AnswerText, SamplingOptions
from serve.decoding import RowBatch


class QueueFull(Exception):
    """max_batch requests are decoding and max_queue more are waiting."""


@dataclass
class Result:
    text: str              # the answer, whitespace stripped (as Engine.reply returns it)
    finish_reason: str     # "stop": the end token or a stop string; "length": max_tokens or the context ran out
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    """One request as the scheduler sees it. `listener` gets text(delta), done(Result) and error(exc),
    called from the scheduler's thread; set `cancelled` to drop the job."""
    ids: list
    visual: VisualInputs
    options: SamplingOptions
    budget: int             # tokens it may generate (max_tokens cut to what the context leaves)
    listener: object
    stream: bool = False    # send text deltas as they settle (else only the result)
    cancelled: threading.Event = field(default_factory=threading.Event)
    shown: str = ""         # what text() has sent so far


class Ticket:
    """A place in the server, held from acceptance to the response's end; release() is idempotent."""

    def __init__(self, scheduler):
        self._scheduler, self._held = scheduler, True

    def release(self):
        if self._held:
            self._held = False
            self._scheduler._release()


class Scheduler:
    """Decodes submitted jobs in batches of up to max_batch rows on the engine's model (see module doc)."""

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be 1 or more and max_queue 0 or more, not {max_batch}, {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.batch = RowBatch(engine.model)
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "steps": 0, "peak_rows": 0}
        self._waiting = deque()
        self._held = 0
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="serve-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the requests' side

    def reserve(self) -> Ticket:
        """A place for one more request, or QueueFull."""
        with self._wake:
            if self._held >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} requests are being answered and {self.max_queue} are waiting")
            self._held += 1
        return Ticket(self)

    def _release(self):
        with self._wake:
            self._held -= 1

    def submit(self, job: Job):
        with self._wake:
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the scheduler is not running")
            self._waiting.append(job)
            self._wake.notify()

    def counts(self) -> dict:
        with self._wake:
            return {**self.stats, "rows": len(self.batch.rows), "waiting": len(self._waiting), "held": self._held}

    def close(self, timeout: float = 10.0):
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------ the scheduler's thread

    def _run(self):
        with torch.no_grad():
            while self._wait_for_work():
                with self.engine.model.lm.frozen_weights():   # joint weights concatenated once per busy spell
                    while not self._closed and (self._admit() or self.batch.rows):
                        self._advance()
        for job in self._abandon_all():
            job.listener.error(RuntimeError("the server is shutting down"))

    def _wait_for_work(self) -> bool:
        with self._wake:
            while not self._waiting and not self._closed:
                self._wake.wait()
            return not self._closed

    def _take_waiting(self) -> list:
        """Waiting jobs that fit in the batch now, in arrival order; cancelled ones are let go."""
        taken = []
        with self._wake:
            while self._waiting and len(self.batch.rows) + len(taken) < self.max_batch:
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                else:
                    taken.append(job)
        return taken

    def _admit(self) -> bool:
        """Prefill the jobs that fit and join them to the batch; True if any joined."""
        joining = []
        for job in self._take_waiting():
            if job.budget <= 0:   # max_tokens 0: an empty answer, nothing to decode
                self._finish(job, AnswerText(self.engine.tokenizer, self.engine.chat.im_end), "length", 0)
                continue
            try:
                answer = AnswerText(self.engine.tokenizer, self.engine.chat.im_end, job.options.stop)
                joining.append(self.batch.prefill(job.ids, job.visual, job, answer, job.options, job.budget))
            except Exception as e:   # a bug or out of memory: this request fails, the server goes on
                self._fail([job], e)
        try:
            self.batch.join(joining)
        except Exception as e:
            self._fail([row.owner for row, _ in joining], e)
            return False
        self.stats["peak_rows"] = max(self.stats["peak_rows"], len(self.batch.rows))
        return bool(joining)

    def _advance(self):
        """One token for every row: pick, hand out text, drop the finished and abandoned rows, feed the rest."""
        try:
            tokens = self.batch.pick()
            leaving, fed = [], []
            for row, token in zip(self.batch.rows, tokens):
                if self._take_token(row, token):
                    leaving.append(row)
                else:
                    fed.append(token)
            self.batch.drop(leaving)
            if self.batch.rows:
                self.batch.step(fed)
                self.stats["steps"] += 1
        except Exception as e:   # the batch's state is unknown now: fail its rows, start afresh
            self._fail([row.owner for row in self.batch.rows], e)
            self.batch = RowBatch(self.engine.model)

    def _take_token(self, row, token: int) -> bool:
        """Add the token to the row's answer and tell its job; True when the row leaves the batch."""
        job = row.owner
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            return True
        row.answer.add(token)
        row.generated += 1
        if row.answer.done or row.generated >= row.budget:
            self._finish(job, row.answer, "stop" if row.answer.done else "length", row.generated)
            return True
        if job.stream:
            self._send_text(job, row.answer.settled())
        return False

    def _send_text(self, job: Job, text: str, final=False):
        """Send what the visible answer gained. Leading whitespace is never shown and trailing whitespace
        waits for more text, so the deltas join to exactly the final (stripped) answer."""
        visible = text.strip() if final else text.lstrip().rstrip()
        if len(visible) > len(job.shown) and visible.startswith(job.shown):
            delta, job.shown = visible[len(job.shown):], visible
            self._tell(job, "text", delta)

    def _finish(self, job: Job, answer: AnswerText, reason: str, generated: int):
        if job.stream:
            self._send_text(job, answer.text, final=True)
        self.stats["served"] += 1
        self._tell(job, "done", Result(answer.text.strip(), reason, len(job.ids), generated))

    def _fail(self, jobs: list, error: Exception):
        for job in jobs:
            self.stats["failed"] += 1
            self._tell(job, "error", error)

    def _tell(self, job: Job, event: str, value):
        try:
            getattr(job.listener, event)(value)
        except Exception:   # a listener whose request is gone (its event loop closed): drop the job
            job.cancelled.set()

    def _abandon_all(self) -> list:
        with self._wake:
            jobs = list(self._waiting) + [row.owner for row in self.batch.rows]
            self._waiting.clear()
        self.batch = RowBatch(self.engine.model)
        return jobs
