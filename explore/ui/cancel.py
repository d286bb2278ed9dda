"""Stop the computation itself, within one step, when a request is cancelled or its browser tab is closed.

Gradio stops *reading* a generator handler when its event is cancelled or its client goes away, but the work
between two yields (many sampler steps when previews are sparse) would go on. `stoppable` streams a generator
handler as Gradio streams any generator, one item at a time, each computed when Gradio asks for it, on the app's
compute thread (compute.py); while it waits for an item it watches the request: on cancellation or disconnection
it raises the session's stop flag, which the step iterator checks after every step, and the generator is closed
after the step in flight so that its `finally:` blocks free what it holds.

That is all it adds to a plain generator handler. A path that also computed items ahead of Gradio's delivery and
did Gradio's post-processing on the compute thread bought no speed: python -m explore.bench's streaming_paths row
(docs/benchmarks.json at commit 8c9f066, 30 rounds of the same Live-sampling request over HTTP, previews every
step) measured it +5.3% over a plain generator handler (middle half of the rounds -31.8% to +37.1%) and +4.6% over
this path (-21.5% to +13.9%), so it was removed. The same row now measures this path against the plain generator
(docs/benchmarks.md): -1.3%, the middle half of 30 rounds -35.3% to +40.5%.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
from typing import Callable

from explore.ui.compute import schedule, submit
from explore.ui.memory import release_memory
from explore.ui.session import Session

POLL_S = 0.05  # how often a waiting handler looks at its request
_DONE = object()


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


def stoppable(task: str, handler: Callable) -> Callable:
    """Wrap a generator handler whose Session argument has a stop flag named `task` (see Session.stop)."""

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
