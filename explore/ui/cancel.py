"""Stop the computation itself, within one step, when a request is cancelled or its browser tab is closed.

Gradio stops *reading* a generator handler when its event is cancelled or its client goes away, but the work
between two yields (many sampler steps when previews are sparse) would go on. `stoppable` runs a generator
handler on the app's compute thread and, while it waits for items, watches the request: on cancellation or
disconnection it raises the session's stop flag, which the step iterator checks after every step, and then
closes the generator so its `finally:` blocks free what it holds.

The handler does not wait for Gradio between items: it hands each one to the event loop and goes on with the
next (up to AHEAD items not yet taken), so sending a preview costs the step loop no round trip through a busy
event loop. It gives the compute thread way between two items when other work waits for it.

Given the event's output components, `stoppable` also post-processes each item on the compute thread (the event
is then registered with postprocess=False). Gradio would otherwise hand every output of every streamed message
to a worker thread in turn; on a busy CPU each hand-off waits for the GIL, which made post-processing the
largest part of a streamed preview's cost (Gradio's own profiler, GRADIO_PROFILING=1, times it).
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from typing import Callable, Sequence

from gradio import utils as gradio_utils

from explore.ui.compute import others_waiting, schedule, submit
from explore.ui.memory import release_memory
from explore.ui.session import Session

POLL_S = 0.05  # how often a waiting handler looks at its request
AHEAD = 2  # items the handler may compute before Gradio has taken the earlier ones
_DONE = object()


class _Failed:
    """The exception a handler raised, carried to the event loop to be raised there."""

    def __init__(self, error: BaseException):
        self.error = error


class _Producer:
    """Runs a sync generator on the compute thread and hands its items to the event loop as they come.

    The generator is advanced only on the compute thread, by one task at a time: the task parks when AHEAD items
    wait to be taken (taking one resumes it), and gives way to other queued work between two items."""

    def __init__(self, iterator, context: contextvars.Context, loop: asyncio.AbstractEventLoop):
        self.iterator, self.context, self.loop = iterator, context, loop
        self.items: asyncio.Queue = asyncio.Queue()
        self.lock = threading.Lock()
        self.waiting = 0  # items handed over and not yet taken
        self.parked = self.abandoned = self.over = False

    def start(self) -> None:
        schedule(self.context, self._run)

    def _run(self) -> None:
        while True:
            with self.lock:
                if self.abandoned:
                    break
                if self.waiting >= AHEAD:
                    self.parked = True
                    return
            try:
                item = next(self.iterator, _DONE)
            except BaseException as error:  # noqa: BLE001 -- raised again on the event loop
                item = _Failed(error)
            with self.lock:
                self.waiting += 1
                self.over = item is _DONE or isinstance(item, _Failed)
            try:
                self.loop.call_soon_threadsafe(self.items.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody will take it
                break
            if self.over:
                return
            if others_waiting():
                schedule(self.context, self._run)
                return
        with self.lock:  # abandoned, or the event loop is gone
            self.over = True
        self.iterator.close()
        release_memory()

    async def get(self):
        item = await self.items.get()
        with self.lock:
            self.waiting -= 1
        self._unpark()
        return item

    def abandon(self) -> None:
        """Close the generator as soon as it is between items (at once if it is parked)."""
        with self.lock:
            self.abandoned = True
        self._unpark()

    def _unpark(self) -> None:
        with self.lock:
            resume, self.parked = self.parked and not self.over, False
        if resume:
            schedule(self.context, self._run)


def _event_alive() -> Callable[[], bool]:
    """Whether the current Gradio event still has a client (False once its tab is closed or it is cancelled)."""
    try:
        from gradio.context import LocalContext
        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        events = blocks._queue.event_ids_to_events  # Gradio internals; without them only cancellation is seen
    except Exception:
        return lambda: True

    def alive() -> bool:
        event = events.get(event_id)
        return event is None or getattr(event, "alive", True)
    return alive


def serialized(component, value):
    """What Gradio's post-processing would send for `value` (updates and session state are left to Gradio)."""
    if getattr(component, "stateful", False) or gradio_utils.is_prop_update(value):
        return value
    out = component.postprocess(value)
    return out.model_dump() if hasattr(out, "model_dump") else out


_NOTHING = object()  # no value yielded yet


def _serializing(items, outputs: Sequence):
    """Each item post-processed for `outputs`. A value the handler yields again (the same object, e.g. telemetry
    tables between refreshes) reuses its payload: no second post-processing, and Gradio's diff sees no change.
    Handlers therefore yield new objects for new values and never mutate one they have yielded."""
    last: list[tuple[object, object]] = [(_NOTHING, None)] * len(outputs)
    try:
        for item in items:
            for i, (component, value) in enumerate(zip(outputs, item, strict=True)):
                if value is not last[i][0]:
                    last[i] = (value, serialized(component, value))
            yield tuple(payload for _, payload in last)
    finally:
        items.close()  # closing this generator closes the handler's at once


def stoppable(task: str, handler: Callable, outputs: Sequence | None = None) -> Callable:
    """Wrap a generator handler whose Session argument has a stop flag named `task` (see Session.stop).

    With `outputs` (the event's output components, registered with postprocess=False) every item is
    post-processed for them on the compute thread."""

    @functools.wraps(handler)
    async def run(*args, **kwargs):
        session = next((a for a in (*args, *kwargs.values()) if isinstance(a, Session)), None)
        alive = _event_alive()
        items = handler(*args, **kwargs)
        producer = _Producer(items if outputs is None else _serializing(items, outputs), contextvars.copy_context(),
                             asyncio.get_running_loop())
        producer.start()
        finished, taking = False, None
        try:
            while True:
                taking = asyncio.ensure_future(producer.get())
                while True:
                    done, _ = await asyncio.wait({taking}, timeout=POLL_S)
                    if done:
                        break
                    if session is not None and not alive():  # the tab was closed: end after this step
                        session.request_stop(task)
                item = taking.result()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, _Failed):
                    finished = True
                    raise item.error
                yield item
        finally:  # finished, failed, cancelled, disconnected or closed by Gradio
            if taking is not None and not taking.done():
                taking.cancel()
            if session is not None and not finished:
                session.request_stop(task)  # the step loop ends after the step it is in
            producer.abandon()

    return run


def plain_stoppable(task: str, handler: Callable) -> Callable:
    """`handler` streamed as Gradio streams any generator, one item at a time (computed when Gradio asks for it,
    on the compute thread, post-processed by Gradio), and stopped within a step like `stoppable`: on cancellation
    or disconnection the session's stop flag is raised at once, and the generator is closed after the step in
    flight."""

    @functools.wraps(handler)
    async def run(*args, **kwargs):
        session = next((a for a in (*args, *kwargs.values()) if isinstance(a, Session)), None)
        alive = _event_alive()
        items, context = handler(*args, **kwargs), contextvars.copy_context()
        finished = False
        try:
            while True:
                taking = submit(context, next, items, _DONE)
                while not (await asyncio.wait({taking}, timeout=POLL_S))[0]:
                    if session is not None and not alive():  # the tab was closed: end after this step
                        session.request_stop(task)
                try:
                    item = taking.result()
                except BaseException:
                    finished = True  # the handler's own error: it is over
                    raise
                if item is _DONE:
                    finished = True
                    return
                yield item
        finally:  # finished, failed, cancelled, disconnected or closed by Gradio
            if session is not None and not finished:
                session.request_stop(task)  # the step loop ends after the step it is in
            schedule(context, _close, items)  # on the compute thread, after that step

    return run


def _close(items) -> None:
    items.close()
    release_memory()
