"""Stop the computation itself, within one step, when a request is cancelled or its browser tab is closed.

Gradio stops *reading* a generator handler when its event is cancelled or its client goes away, but the work
between two yields (many sampler steps when previews are sparse) would go on. `stoppable` runs a generator
handler one item at a time on the app's compute thread and, while it waits, watches the request: on cancellation or
disconnection it raises the session's stop flag, which the step iterator checks after every step, and then
closes the generator so its `finally:` blocks free what it holds. The handler runs one item ahead of
Gradio: while an item (a preview) is sent, the next one is already being computed.

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

from explore.ui.compute import COMPUTE, submit
from explore.ui.memory import release_memory
from explore.ui.session import Session

POLL_S = 0.05  # how often a waiting handler looks at its request
_DONE = object()


class _Runner:
    """Advances a sync generator on the compute thread; closes it as soon as it is abandoned and idle."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.lock = threading.Lock()
        self.busy = False
        self.abandoned = False

    def step(self):
        try:
            return next(self.iterator, _DONE)
        finally:
            with self.lock:
                self.busy = False
                if self.abandoned:
                    self._close()

    def _close(self) -> None:
        self.iterator.close()
        release_memory()

    def submit(self, context: contextvars.Context) -> asyncio.Future:
        with self.lock:
            self.busy = True
        return submit(context, self.step)

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True
            if not self.busy:  # off the event loop: the generator's finally and the trim may take a moment
                COMPUTE.submit(self._close)


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
        context = contextvars.copy_context()
        items = handler(*args, **kwargs)
        runner = _Runner(items if outputs is None else _serializing(items, outputs))
        finished = False
        try:
            pending = runner.submit(context)
            while True:
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=POLL_S)
                    if done:
                        break
                    if session is not None and not alive():  # the tab was closed: end after this step
                        session.request_stop(task)
                item = pending.result()
                if item is _DONE:
                    finished = True
                    return
                # the handler computes its next item while Gradio encodes and sends this one
                pending = runner.submit(context)
                yield item
        finally:  # finished, failed, cancelled, disconnected or closed by Gradio
            if session is not None and not finished:
                session.request_stop(task)  # the step loop ends after the step it is in
            runner.abandon()

    return run
