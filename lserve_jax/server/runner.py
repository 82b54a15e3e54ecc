"""`EngineRunner`: the one thread that owns the engine (and so the device).

HTTP handlers never touch the engine: they call `submit` (which hands the request to the
engine thread and waits for its answer: accepted, or the engine's error) and then read the
request's outputs from an asyncio queue that the engine thread fills after every step; `abort`
(a client that went away) is queued the same way. The engine thread steps while any request is
unfinished and sleeps on its command queue otherwise. A bounded number of requests may be
waiting or running at once (`max_pending`): past it `submit` raises `QueueFull` (HTTP 503)
instead of letting the queue grow without limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Hashable

from lserve_jax.engine.outputs import RequestOutput

log = logging.getLogger("lserve_jax.server")


class QueueFull(Exception):
    """Too many requests are waiting or running."""


class EngineDead(Exception):
    """The engine thread stopped (shut down, or an engine step raised)."""


@dataclasses.dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineRunner:
    """Runs `engine` in a background thread (see the module docstring).

    on_step(engine, outputs) is called in the engine thread after every step (metrics)."""

    def __init__(self, engine, *, max_pending: int = 1024,
                 on_step: Callable[[object, list[RequestOutput]], None] | None = None):
        self.engine = engine
        self.max_pending = max_pending
        self.on_step = on_step
        self._commands: queue.Queue = queue.Queue()
        self._subscribers: dict[Hashable, _Subscriber] = {}
        self._pending = 0  # submitted and not finished (guarded by _lock)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="lserve-engine", daemon=True)

    # ---- control ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever still runs and stop the engine thread."""
        self._stopping.set()
        self._commands.put(("wake", None, None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping.is_set()

    @property
    def num_pending(self) -> int:
        return self._pending

    def call(self, fn: Callable, timeout: float | None = None):
        """Run fn(engine) in the engine thread and return its result (for warm-up, tests)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, future))
        return future.result(timeout)

    # ---- requests --------------------------------------------------------------------------

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def submit(self, request_id: Hashable, prompt, sampling_params) -> asyncio.Queue:
        """Add a request in the engine thread; returns the queue its RequestOutputs arrive on
        (the last one has `finished`). Raises the engine's ValueError / TypeError for a bad
        request, QueueFull past `max_pending`, EngineDead when the engine is not running."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests are waiting or running (the limit "
                                f"is {self.max_pending}); retry later")
            self._pending += 1
        loop = asyncio.get_running_loop()
        sub = _Subscriber(loop, asyncio.Queue())
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", (request_id, prompt, sampling_params, sub), future))
        try:
            answer = asyncio.wrap_future(future)
            while not (await asyncio.wait({answer}, timeout=1.0))[0]:
                if not self._thread.is_alive():  # stopped before it read the command
                    answer.cancel()
                    raise EngineDead("the engine stopped")
            answer.result()
        except BaseException:
            if future.cancel():  # never added
                self._release_slot()
            else:  # being added, or added, or refused: settle once it is known
                future.add_done_callback(lambda f: self._release_slot() if f.exception()
                                         else self.abort(request_id))
            raise
        return sub.queue

    def _release_slot(self) -> None:
        with self._lock:
            self._pending -= 1

    def abort(self, request_id: Hashable) -> None:
        """Abort a request (no-op if it already finished)."""
        self._commands.put(("abort", request_id, None))

    # ---- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stopping.is_set():
                block = not engine.has_unfinished_requests()
                self._drain(block=block)
                if self._stopping.is_set():
                    break
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    self._deliver(outputs)
                    if self.on_step is not None:
                        self.on_step(engine, outputs)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear of it
            self.error = e
            log.exception("the engine thread stopped")
        finally:
            self._shutdown()

    def _drain(self, *, block: bool) -> None:
        """Run queued commands; with `block`, wait (a little) for the first one."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self, kind: str, arg, future) -> None:
        engine = self.engine
        if kind == "add":
            request_id, prompt, sampling_params, sub = arg
            if not future.set_running_or_notify_cancel():
                return  # the submitter gave up before it was read
            try:
                engine.add_request(request_id, prompt, sampling_params)
            except Exception as e:  # noqa: BLE001 - the submitter gets it
                future.set_exception(e)
                return
            self._subscribers[request_id] = sub
            future.set_result(None)
        elif kind == "abort":
            if arg in self._subscribers:
                out = engine.abort_request(arg)
                self._deliver([out])
                if self.on_step is not None:
                    self.on_step(engine, [out])
        elif kind == "call":
            try:
                future.set_result(arg(engine))
            except Exception as e:  # noqa: BLE001
                future.set_exception(e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sub = self._subscribers.get(out.request_id)
            if sub is None:
                continue
            if out.finished:
                del self._subscribers[out.request_id]
                self._release_slot()
            _tell(sub, out)

    def _shutdown(self) -> None:
        """Abort every request still running and tell its waiter; refuse queued commands."""
        engine = self.engine
        for request_id in list(self._subscribers):
            try:
                self._deliver([engine.abort_request(request_id)])
            except Exception:  # noqa: BLE001 - the engine may be broken
                sub = self._subscribers.pop(request_id, None)
                if sub is not None:
                    self._release_slot()
                    _tell(sub, EngineDead("the engine stopped"))
        while True:
            try:
                kind, _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            if future is not None and not future.done():
                future.set_exception(EngineDead("the engine is shutting down"))
        self._stopping.set()


def _tell(sub: _Subscriber, item) -> None:
    """Put `item` on a subscriber's queue from the engine thread (dropped if its event loop
    has closed: nobody is waiting any more)."""
    try:
        sub.loop.call_soon_threadsafe(sub.queue.put_nowait, item)
    except RuntimeError:
        pass
