"""Many users on one server: concurrent streaming clients get the results they would get alone, a full queue
answers 'busy', and a cancelled run or a closed tab stops the sampling itself within one step."""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import load
from explore.ui.cancel import POLL_S

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
QUEUE_SIZE = 10
# Steps paced to last this long while a test counts the steps computed after a cancel: several times the
# handler's poll of its request (POLL_S), so the server notices within the step in flight whatever the
# machine's speed or load (unpaced, a tiny step takes 5-50 ms and the count measured the machine).
PACE_S = 5 * POLL_S


@pytest.fixture(scope="module")
def server(app_checkpoints, tmp_path_factory):
    """The app with a step log (one line per computed sampler step, tests/step_log_app.py) and a small queue."""
    work = tmp_path_factory.mktemp("load-server")
    env = {"EXPLORE_TEST_STEP_LOG": str(work / "steps.log"), "EXPLORE_TEST_STEP_PACE": str(work / "pace"),
           "EXPLORE_QUEUE_SIZE": str(QUEUE_SIZE)}
    with load.serve(app_checkpoints, work, env, script=Path(__file__).with_name("step_log_app.py")) as running:
        running.steps_log, running.pace_file = work / "steps.log", work / "pace"
        yield running
    assert running.proc.returncode is not None


def logged_steps(server) -> list[tuple[float, int]]:
    """(time, step index) of every sampler step the server has computed so far."""
    if not server.steps_log.exists():
        return []
    rows = [line.split() for line in server.steps_log.read_text().splitlines() if line.strip()]
    return [(float(t), int(i)) for t, i in rows]


@contextlib.contextmanager
def paced(server, seconds: float = PACE_S):
    """Every step the server computes inside the block lasts at least `seconds` (tests/step_log_app.py)."""
    server.pace_file.write_text(str(seconds))
    try:
        yield
    finally:
        server.pace_file.unlink()


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_concurrent_streaming_clients_get_what_they_get_alone(server, tmp_path):
    """8 users x 2 rounds (the short form of `python -m tests.load`): all complete, identical, own state."""
    report = load.load_test(server.url, clients=8, rounds=2, steps=3, server=server, downloads=tmp_path)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "load-short.json").write_text(json.dumps({**report.__dict__, "summary": report.summary()},
                                                          indent=1, default=float) + "\n")
    print(report.summary())
    assert report.errors == [] and report.runs == report.completed == 16
    assert report.identical_to_solo == 16 and report.own_state == 16
    assert report.p95_s > 0 and server.alive()  # a stalled run fails above (load_test's run_timeout), not a clock


def test_a_full_queue_answers_busy_and_the_server_goes_on(server, tmp_path):
    from gradio_client.utils import Status

    users = [load.client(server.url, tmp_path / f"user{i}") for i in range(3)]
    before = len(logged_steps(server))
    with paced(server):  # the long run surely outlasts the requests below, however fast the machine
        long_run = users[0].submit(*load.sample_args(0, 1000), api_name="/sample")
        wait_for(lambda: len(logged_steps(server)) > before, what="a running job")
        jobs, busy = [], []
        for i in range(QUEUE_SIZE + 4):
            job = users[1 + i % 2].submit(*load.sample_args(i, 2), api_name="/sample")
            jobs.append(job)
        # every request answered: refused (its job ends with the error) or queued behind the long run
        wait_for(lambda: all(job.done() or job.status().code == Status.IN_QUEUE for job in jobs),
                 what="an answer to every request")
        for job in jobs:
            if job.done():
                try:
                    job.result()
                except Exception as err:  # noqa: BLE001 - sorted below
                    if "queue is full" in str(err).lower():
                        busy.append(str(err))
        for job in (long_run, *jobs):
            job.cancel()
    assert len(busy) >= 1, "an over-full queue must refuse politely"
    assert all("Please try again" in message for message in busy), busy
    fresh = load.client(server.url, tmp_path / "after")
    seconds, images = load.run_once(fresh, load.sample_args(1, 2))
    assert images.shape == (1, 32, 32, 3) and server.alive()


def test_cancel_ends_the_sampling_within_one_step(server, tmp_path):
    """job.cancel() while the handler is between yields (previews only every 50 steps)."""
    user = load.client(server.url, tmp_path / "user")
    before = len(logged_steps(server))
    args = load.sample_args(0, 1000, batch=4)
    args[-1] = 50  # previews every 50 steps: the cancel arrives while the loop is between two yields
    with paced(server):  # a step outlasts the cancel's trip over HTTP and the handler's poll
        job = user.submit(*args, api_name="/sample")
        wait_for(lambda: len(logged_steps(server)) >= before + 5, what="5 sampler steps")
        cancelled = time.time()  # before the request: /cancel itself may wait for the handler
        job.cancel()
        time.sleep(2.0)
        cpu = server.cpu_seconds()
        time.sleep(1.0)
        idle_cpu = server.cpu_seconds() - cpu
    run = logged_steps(server)[before:]
    after = [i for t, i in run if t > cancelled]
    print(f"cancel: {len(after)} steps after the cancel; {idle_cpu:.2f} s CPU in the next second")
    # the cancel travels over HTTP while a step runs: the step in flight and at most one that started before
    # the server saw the request may finish; nothing after that (checked again by the idle CPU below)
    assert len(after) <= 2, f"{len(after)} steps were computed after the cancel"
    assert len(run) < 1000 and idle_cpu < 0.3, (len(run), idle_cpu)
    # the session can run again straight away
    assert load.run_once(user, load.sample_args(0, 2))[1].shape == (1, 32, 32, 3)


CLOSING_CLIENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    import load
    args = load.sample_args(0, 1000)
    args[-1] = 50
    user = load.client(sys.argv[1], Path(sys.argv[2]))
    user.submit(*args, api_name="/sample")
    print("submitted", flush=True)
    time.sleep(600)
""")


def test_closed_tab_ends_the_sampling(server, tmp_path):
    """A client process killed mid-run (a closed browser tab): the sampling stops within a step of it noticing."""
    before = len(logged_steps(server))
    with paced(server):  # a step outlasts the server's noticing (the handler polls its request)
        proc = subprocess.Popen([sys.executable, "-c", CLOSING_CLIENT, server.url, str(tmp_path),
                                 str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: len(logged_steps(server)) >= before + 5, what="5 sampler steps")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        closed = time.time()
        time.sleep(3.0)
        cpu = server.cpu_seconds()
        time.sleep(1.0)
        idle_cpu = server.cpu_seconds() - cpu
    run = logged_steps(server)[before:]
    after = [i for t, i in run if t > closed]
    print(f"closed tab: {len(after)} steps after the connection closed; {idle_cpu:.2f} s CPU in the next second")
    assert len(after) <= 3, f"{len(after)} steps were computed after the client went away"
    assert len(run) < 1000 and idle_cpu < 0.3, (len(run), idle_cpu)
    assert server.alive()


def test_models_are_shared_read_only(app_context):
    """Every request gets the same loaded module; a run changes none of its weights and swaps nothing."""
    import hashlib

    import torch

    from explore.ui.form import Form
    from explore.ui.sampling import Sampler
    from explore.ui.session import Session

    def fingerprint(module):
        digest = hashlib.sha256()
        for name, tensor in module.state_dict().items():
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    entry = app_context.registry.get(load.BASE)
    before = fingerprint(entry.module)
    assert not any(p.requires_grad for p in entry.module.parameters()) and not entry.module.training
    for user in range(2):
        run = Form(app_context).handler(Sampler(app_context).run, Sampler.INPUTS)
        outputs = list(run(*load.sample_args(user, 2), session=Session()))
        assert outputs[-1][2].startswith("Finished")
    assert app_context.registry.get(load.BASE) is entry and fingerprint(entry.module) == before
    assert torch.is_grad_enabled()  # the step iterator's no_grad did not leak into the caller


def test_stoppable_ends_the_loop_between_yields_and_closes_the_generator():
    """In-process: a cancelled request raises the stop flag at once; the loop ends after its current step and
    the generator's finally runs, though the handler yields only once in a thousand steps."""
    import asyncio
    import threading

    from explore.ui.cancel import stoppable
    from explore.ui.session import Session

    session, steps, closed = Session(), [], threading.Event()

    def handler(session):
        session.start("sample")
        try:
            for i in range(1000):
                if session.stop["sample"]:  # as Plan.steps(should_stop=...) checks after every step
                    return
                time.sleep(0.1)  # a step that outlasts the cancelling thread's wait for a core on a busy machine
                steps.append(i)
                if i == 2:
                    yield "first preview"
            yield "never reached"
        finally:
            closed.set()

    async def request():
        run = stoppable("sample", handler)(session)
        assert await run.__anext__() == "first preview"
        pending = asyncio.ensure_future(run.__anext__())
        await asyncio.sleep(0.25)
        done_before = len(steps)
        pending.cancel()  # what Gradio does on /cancel
        with pytest.raises(asyncio.CancelledError):
            await pending
        return done_before

    done_before = asyncio.run(request())
    assert closed.wait(5), "the generator was not closed"
    # at most the step in flight when the cancel came (and one more if that one ended while it was delivered)
    assert session.stop["sample"] and len(steps) <= done_before + 2 < 1000


def test_memory_helpers_are_safe_to_call():
    from explore.ui import memory
    assert isinstance(memory.release_memory(), bool) and isinstance(memory.limit_arenas(2), bool)


def test_handlers_run_on_one_compute_thread_and_give_way_between_items():
    """libgomp slows every op down once several threads have run parallel ops (explore/ui/compute.py): the
    stoppable generator handlers and the plain heavy handlers all run on the one compute thread. An item is
    computed when Gradio asks for it, so other work queued for the compute thread runs between two items of a long
    handler instead of after it."""
    import asyncio
    import threading

    from explore.ui.cancel import stoppable
    from explore.ui.compute import on_compute_thread
    from explore.ui.session import Session

    threads, log, plain_queued = [], [], threading.Event()

    def handler(session):
        for i in range(12):
            threads.append(threading.get_ident())
            time.sleep(0.01)
            if i == 6:  # mid-way, until the plain handler waits for the compute thread (no race with a clock)
                assert plain_queued.wait(60)
            log.append(i)
            yield i

    def plain(x):
        threads.append(threading.get_ident())
        log.append("plain")
        return 2 * x

    async def request():
        run = stoppable("sample", handler)(Session())
        first = await run.__anext__()
        await asyncio.sleep(0.3)  # "delivering" item 0
        ahead = list(log)
        rest = asyncio.ensure_future(collect(run))  # taken at once from now on: the handler never waits
        await asyncio.sleep(0.03)
        doubled = asyncio.ensure_future(on_compute_thread(plain)(4))  # queued while the handler runs on
        await asyncio.sleep(0)  # the task submits the call to the compute thread
        plain_queued.set()
        return first, ahead, await doubled, await rest

    async def collect(run):
        return [item async for item in run]

    first, ahead, doubled, rest = asyncio.run(request())
    assert (first, doubled, rest) == (0, 8, list(range(1, 12)))
    assert ahead == [0]  # nothing was computed while item 0 was out: Gradio had not asked for item 1
    assert "plain" in log[:-1], log  # the plain handler did not wait for the generator to end
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()


def test_a_handler_error_reaches_the_request_after_the_items_before_it():
    """An exception raised by the handler on the compute thread is raised to Gradio, after every item it yielded
    before it, and the stop flag is left alone (the handler is over)."""
    import asyncio

    from explore.ui.cancel import stoppable
    from explore.ui.session import Session

    session = Session()

    def handler(session):
        session.start("sample")
        yield "a preview"
        raise ValueError("bad recipe")

    async def request():
        got = []
        with pytest.raises(ValueError, match="bad recipe"):
            async for item in stoppable("sample", handler)(session):
                got.append(item)
        return got

    assert asyncio.run(request()) == ["a preview"]
    assert not session.stop["sample"]
