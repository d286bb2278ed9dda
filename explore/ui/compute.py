"""One thread for every model computation of the app.

PyTorch's OpenMP runtime on Linux (libgomp) keeps a team of worker threads for each thread that runs a parallel
op. Once the process holds more OpenMP threads than CPUs, libgomp stops spinning at its barriers and sleeps in
futex waits instead, and the many small ops of a sampling step pay a wake-up each (on a 2-core machine the
step loop slowed down markedly once a second thread had run the model). Gradio calls handlers from pools of
threads, so the app sends all model work to this single thread.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explore-compute")


def schedule(context: contextvars.Context, fn: Callable, *args) -> Future:
    """Run fn(*args) on the compute thread inside `context`, from any thread."""
    return COMPUTE.submit(context.run, fn, *args)


def submit(context: contextvars.Context, fn: Callable, *args) -> asyncio.Future:
    """Run fn(*args) on the compute thread inside `context` (Gradio's request context); awaitable."""
    return asyncio.get_running_loop().run_in_executor(COMPUTE, context.run, fn, *args)


def on_compute_thread(fn: Callable) -> Callable:
    """Wrap a plain (non-generator) handler so that it runs on the compute thread."""

    @functools.wraps(fn)
    async def run(*args, **kwargs):
        return await submit(contextvars.copy_context(), functools.partial(fn, *args, **kwargs))

    return run
