"""A virtual-time asyncio event loop, and simulated processes that live in it.

``VirtualTimeLoop.time()`` is virtual. When no callback is ready, the loop
jumps the clock to the next timer instead of waiting, so a simulated minute
takes only as long as the work done in it. There is no I/O at all: nothing
can become ready except through a callback or a timer, which makes every run
with the same inputs execute the same callbacks in the same order.

A ``Process`` is one simulated OS process (a node incarnation). Everything
the node does runs in the process's ``contextvars.Context``; asyncio copies
the current context into every task and callback, so each handle carries
its owner. The loop looks at the owner before running a handle: a paused
process's handles are parked until it resumes (SIGSTOP/SIGCONT), and a
crashed process's handles are dropped for good (SIGKILL: its tasks are
abandoned mid-flight, ``finally`` blocks and all).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

RUNNING, PAUSED, CRASHED = "running", "paused", "crashed"

_OWNER: contextvars.ContextVar[Process | None] = contextvars.ContextVar("sim_owner", default=None)

# Compact the timer heap once it holds more than this many cancelled timers and
# they are more than half of it (as asyncio does).
_MIN_CANCELLED_TO_COMPACT = 100


class SimulationStuck(RuntimeError):
    """Nothing is ready and no timer is set: the awaited result can never come."""


class Process:
    """One simulated process; its tasks and callbacks run in ``context``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = RUNNING
        self.parked: deque[Any] = deque()  # handles that came due while paused
        self.context = contextvars.Context()
        self.context.run(_OWNER.set, self)

    def __repr__(self) -> str:
        return f"Process({self.name!r}, {self.state})"


class _Callback:
    """A ready callback: ``asyncio.Handle`` without its debug bookkeeping. Nearly
    every step of every simulated node passes through here, so it is kept light:
    the caller supplies the context (copied or not), and the loop reports what
    the callback raises. ``_scheduled`` (on the timer heap) is set only where it
    is read: for timers, by ``_timer``, and cleared as the heap gives them up."""

    __slots__ = ("_callback", "_args", "_context", "_cancelled", "_scheduled")

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...],
                 context: contextvars.Context) -> None:
        self._callback = callback
        self._args = args
        self._context = context
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    def get_context(self) -> contextvars.Context:
        return self._context


class _Timer(_Callback):
    """A timer: ``asyncio.TimerHandle``'s interface on the light callback. (``_when``,
    ``_loop`` and ``_scheduled`` are set by ``_timer``: no ``__init__`` of its own,
    one call fewer per timer.)"""

    __slots__ = ("_when", "_loop")

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            if self._scheduled:
                self._loop._timer_cancelled_count += 1


class VirtualTimeLoop(asyncio.BaseEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._disposed = False  # closed by dispose: late callbacks are dropped
        self._timer_seq = itertools.count()
        self.errors: list[str] = []  # unhandled exceptions reported by asyncio
        # Until a process is first paused or crashed, every handle's owner is
        # running and the loop need not look its owner up.
        self._all_running = True

    # -- time ----------------------------------------------------------------

    def time(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any,
                   context: contextvars.Context | None = None) -> Any:
        return self._timer(self._now + delay, callback, args, context)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any,
                context: contextvars.Context | None = None) -> Any:
        return self._timer(when, callback, args, context)

    def _timer(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...],
               context: contextvars.Context | None) -> _Timer:
        if self._closed:
            raise RuntimeError("Event loop is closed")
        timer = _Timer(callback, args, context if context is not None else contextvars.copy_context())
        timer._when = when
        timer._loop = self
        # Heap entries are (when, sequence, timer): equal deadlines fire in the order
        # they were set, whatever the heap's shape (asyncio's timers compare only
        # ``when``), and the comparison stays in C.
        heapq.heappush(self._scheduled, (when, next(self._timer_seq), timer))
        timer._scheduled = True
        return timer

    def deliver_later(self, delay: float, context: contextvars.Context,
                      callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """``call_later`` for what is never cancelled (a message in flight), at less cost."""
        heapq.heappush(self._scheduled, (self._now + delay, next(self._timer_seq),
                                         _Callback(callback, args, context)))

    def call_soon(self, callback: Callable[..., Any], *args: Any,
                  context: contextvars.Context | None = None) -> Any:
        handle = _Callback(callback, args,
                           context if context is not None else contextvars.copy_context())
        if self._closed:
            if self._disposed:
                # A coroutine the run abandoned, collected after ``dispose``, runs
                # its ``finally`` (a future cancelled, say): nothing will ever run.
                return handle
            raise RuntimeError("Event loop is closed")
        self._ready.append(handle)
        return handle

    def create_task(self, coro: Any, *, name: str | None = None,
                    context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        """``BaseEventLoop.create_task`` without the task-factory and debug-traceback
        branches, which the simulator never uses: every handler of every node starts here."""
        if self._closed:
            raise RuntimeError("Event loop is closed")
        return asyncio.Task(coro, loop=self, name=name, context=context)

    # -- processes -------------------------------------------------------------

    def pause(self, process: Process) -> None:
        if process.state == RUNNING:
            process.state = PAUSED
            self._all_running = False

    def resume(self, process: Process) -> None:
        if process.state == PAUSED:
            process.state = RUNNING
            self._ready.extend(process.parked)
            process.parked.clear()

    def crash(self, process: Process) -> None:
        process.state = CRASHED
        process.parked.clear()
        self._all_running = False

    def dispose(self) -> None:
        """Drop every pending callback and timer, free what only they kept alive
        (abandoned coroutines run their ``finally`` blocks now, harmlessly, while
        the loop is still open), then close."""
        self._ready.clear()
        for _when, _seq, timer in self._scheduled:
            timer._scheduled = False
        self._scheduled.clear()
        gc.collect()
        self._ready.clear()
        self._scheduled.clear()
        self.close()
        self._disposed = True

    # -- the scheduler -----------------------------------------------------------

    def _run_once(self) -> None:
        """Run callbacks batch by batch as asyncio does (what a batch schedules runs
        in the next one), jumping the clock to the next timer whenever nothing is
        ready, until the loop is stopped. (asyncio's ``run_forever`` calls this in
        a loop; doing the looping here saves a call per batch, the hottest path.)"""
        ready = self._ready
        while not self._stopping:
            scheduled = self._scheduled
            if not ready:
                # Nothing to do until the next live timer: jump there instead of
                # waiting. (Cancelled timers are dropped from the top of the heap
                # here, and the heap compacted when they are most of it; while
                # callbacks are ready, the due timers below are all that matter.)
                if (self._timer_cancelled_count > _MIN_CANCELLED_TO_COMPACT
                        and self._timer_cancelled_count * 2 > len(scheduled)):
                    self._compact()
                    scheduled = self._scheduled
                while scheduled and scheduled[0][2]._cancelled:
                    self._timer_cancelled_count -= 1
                    heapq.heappop(scheduled)[2]._scheduled = False
                if not scheduled:
                    raise SimulationStuck("no callback is ready and no timer is set")
                if scheduled[0][0] > self._now:
                    self._now = scheduled[0][0]
            now = self._now
            while scheduled and scheduled[0][0] <= now:
                timer = heapq.heappop(scheduled)[2]
                timer._scheduled = False
                if timer._cancelled:
                    self._timer_cancelled_count -= 1
                else:
                    ready.append(timer)
            for _ in range(len(ready)):
                handle = ready.popleft()
                if handle._cancelled:
                    continue
                context = handle._context
                if not self._all_running:
                    owner = context.get(_OWNER)
                    if owner is not None and owner.state is not RUNNING:
                        if owner.state is PAUSED:
                            owner.parked.append(handle)
                        continue  # crashed: the handle is abandoned
                # asyncio.Handle._run, inlined here: one call fewer per callback.
                try:
                    context.run(handle._callback, *handle._args)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    # What asyncio.Handle does when its callback raises: report it, keep running.
                    self.call_exception_handler(
                        {"message": f"Exception in callback {handle._callback!r}", "exception": exc})

    def _compact(self) -> None:
        """Drop cancelled timers once they are most of the heap (as asyncio does)."""
        live = []
        for entry in self._scheduled:
            if entry[2]._cancelled:
                entry[2]._scheduled = False
            else:
                live.append(entry)
        heapq.heapify(live)
        self._scheduled = live
        self._timer_cancelled_count = 0

    # -- no I/O, no threads ----------------------------------------------------

    def _process_events(self, event_list: Any) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # single-threaded: nobody needs waking

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> Any:
        raise RuntimeError("the simulator runs single-threaded: no executors")

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        """Record what asyncio would log, except tasks destroyed while pending: those are
        the abandoned tasks of crashed processes (and of every node when a run ends)."""
        message = str(context.get("message"))
        if message.startswith("Task was destroyed but it is pending"):
            return
        exc = context.get("exception")
        self.errors.append(f"{message}: {exc!r}" if exc else message)
