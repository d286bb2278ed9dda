"""Load test: N concurrent streaming gradio_client users x R rounds against the app on loopback.

Every run must complete, equal the same recipe run alone (byte-equal arrays), and see only its own session's
state; p50/p95 latency and the server's memory growth are reported.

    python -m tests.load                       # long form: 8 clients x 25 rounds = 200 runs, own server
    python -m tests.load --clients 8 --rounds 2 --url http://127.0.0.1:7860/   # against a running app
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASE, CLF = "scenes32_base", "scenes32_classifier"
CLASSES = ["alpine", "desert", "sunset_ocean", "forest", "night_sky", "lake", "snowfield", "random (per image)"]


# --- the server -----------------------------------------------------------------------------------

@dataclass
class Server:
    """`python app.py` on a free loopback port."""

    proc: subprocess.Popen
    url: str
    log: Path

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields_ = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc.poll() is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(checkpoints: Path, workdir: Path, env: dict | None = None, timeout: float = 180.0,
          script: Path = ROOT / "app.py"):
    """Start the app with `checkpoints` (and extra environment); stop it afterwards.

    `script` runs in place of app.py with app.py's arguments (tests/step_log_app.py: the app with a step log).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    full_env = {**os.environ, "EXPLORE_CHECKPOINTS": str(checkpoints), "GRADIO_ANALYTICS_ENABLED": "False",
                "GRADIO_TEMP_DIR": str(workdir / "gradio"), "EXPLORE_THREADS": "1", "OMP_NUM_THREADS": "1",
                "EXPLORE_OUTPUTS": str(workdir / "runs"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                **(env or {})}
    log_path = workdir / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(script), "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                            env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}/", log_path)
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(server.url, timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def client(url: str, downloads: Path, download: bool = True):
    """A gradio_client user (one session) on loopback; with download=False output files stay on the server."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # else Client() looks up huggingface.co even for localhost
    from gradio_client import Client
    downloads.mkdir(parents=True, exist_ok=True)
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads) if download else False)


# --- one run --------------------------------------------------------------------------------------

def sample_args(user: int, respacing: int, batch: int = 1) -> list:
    """A recipe per user: its own seed, class and step count."""
    return [BASE, CLASSES[user % len(CLASSES)], "ddim", str(respacing), False, CLF, 0.0, 1.0, "standard", 0.0, 0.0,
            1000 + user, batch, 2]


def stream(job, poll_s: float = 0.002):
    """A job's streamed outputs, each as soon as it has arrived. Iterating the Job itself would do, but its
    __next__ sleeps while holding the lock that the receiving thread needs to store a new message, which stalls
    the stream for up to a second now and then (gradio_client 2.x); public outputs()/done() hold it briefly."""
    seen = 0
    while True:
        done = job.done()
        outputs = job.outputs()
        while seen < len(outputs):
            yield outputs[seen]
            seen += 1
        if done:
            return
        time.sleep(poll_s)


def run_once(user_client, args, timeout: float = 120.0) -> tuple[float, np.ndarray]:
    """Submit, stream every preview, return (seconds, final uint8 images); raise on anything unexpected."""
    from explore.outputs import load_samples_npz
    started = time.perf_counter()
    job = user_client.submit(*args, api_name="/sample")
    outputs = []
    for output in stream(job):
        outputs.append(output)
        if time.perf_counter() - started > timeout:
            job.cancel()
            raise TimeoutError(f"run took over {timeout:.0f} s")
    seconds = time.perf_counter() - started
    final = outputs[-1] if outputs else job.result()
    if not str(final[2]).startswith("Finished"):
        raise RuntimeError(f"run did not finish: {final[2]!r}")
    npz = next(str(f) for f in final[9] if str(f).endswith(".npz") and "samples_" in str(f))
    return seconds, load_samples_npz(npz)[0]


def own_state(user_client, steps: int) -> bool:
    """The session's trajectory explorer shows this user's last run (per-user state)."""
    _, _, summary, _ = user_client.predict(0.1, api_name="/trajectory_load")
    return f"{steps} recorded steps of {steps}" in summary


# --- the load test --------------------------------------------------------------------------------

@dataclass
class Report:
    clients: int
    rounds: int
    runs: int = 0
    completed: int = 0
    identical_to_solo: int = 0
    own_state: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    solo_latency_s: float = 0.0
    p50_s: float = 0.0
    p95_s: float = 0.0
    max_s: float = 0.0
    wall_s: float = 0.0
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_growth_pct: float = 0.0
    warmup_runs: int = 0
    rss_trace_mib: list[float] = field(default_factory=list)  # server RSS every few seconds of the measured part

    def summary(self) -> str:
        return (f"{self.completed}/{self.runs} runs completed by {self.clients} concurrent streaming clients x "
                f"{self.rounds} rounds in {self.wall_s:.1f} s; {self.identical_to_solo} identical to the same "
                f"recipe run alone; {self.own_state} saw only their own session state; {len(self.errors)} errors. "
                f"Latency p50 {self.p50_s:.2f} s, p95 {self.p95_s:.2f} s, max {self.max_s:.2f} s "
                f"(alone: {self.solo_latency_s:.2f} s). Server RSS after {self.warmup_runs} warm-up runs "
                f"{self.rss_before_mib:.0f} -> {self.rss_after_mib:.0f} MiB ({self.rss_growth_pct:+.1f}%).")


def steps_for(user: int, base: int) -> int:
    return base + user % 3


def load_test(url: str, clients: int = 8, rounds: int = 2, steps: int = 4, server: Server | None = None,
              downloads: Path | None = None, run_timeout: float = 120.0, warmup: int = 1) -> Report:
    """References alone first, a warm-up round, then `clients` threads with their own sessions, `rounds` runs
    each; memory growth is measured from after the warm-up."""
    downloads = Path(downloads or tempfile.mkdtemp(prefix="explore-load-"))
    report = Report(clients, rounds)
    solo = client(url, downloads / "solo")
    references, solo_times = {}, []
    for user in range(clients):
        seconds, images = run_once(solo, sample_args(user, steps_for(user, steps)), run_timeout)
        references[user] = images
        solo_times.append(seconds)
    report.solo_latency_s = float(np.median(solo_times))
    lock = threading.Lock()

    users = {}

    def user_thread(user: int, rounds: int, into: Report) -> None:
        try:
            me = users[user] = users.get(user) or client(url, downloads / f"user{user}")
        except Exception as err:  # noqa: BLE001 - every failure is counted and reported
            with lock:
                into.runs += rounds
                into.errors.append(f"user {user}: cannot connect: {err!r}")
            return
        for _ in range(rounds):
            n = steps_for(user, steps)
            with lock:
                into.runs += 1
            try:
                seconds, images = run_once(me, sample_args(user, n), run_timeout)
                mine = own_state(me, n)
            except Exception as err:  # noqa: BLE001
                with lock:
                    into.errors.append(f"user {user}: {type(err).__name__}: {err}")
                continue
            with lock:
                into.completed += 1
                into.latencies.append(seconds)
                into.identical_to_solo += bool(np.array_equal(images, references[user]))
                into.own_state += mine

    def concurrently(rounds: int, into: Report) -> None:
        threads = [threading.Thread(target=user_thread, args=(user, rounds, into), daemon=True)
                   for user in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # a concurrent warm-up round (caches, thread pools) first: memory growth is measured from after it
    warm = Report(clients, warmup)
    concurrently(warmup, warm)
    report.warmup_runs = warm.completed
    report.errors += [f"warm-up: {e}" for e in warm.errors]
    before = server.rss_bytes() if server else 0
    started = time.perf_counter()
    done = threading.Event()

    def trace() -> None:
        while server and not done.wait(2.0):
            report.rss_trace_mib.append(round(server.rss_bytes() / 2 ** 20, 1))

    tracer = threading.Thread(target=trace, daemon=True)
    tracer.start()
    concurrently(rounds, report)
    done.set()
    tracer.join()
    report.wall_s = time.perf_counter() - started
    if report.latencies:
        report.p50_s, report.p95_s = (float(v) for v in np.percentile(report.latencies, [50, 95]))
        report.max_s = float(max(report.latencies))
    if server:
        after = server.rss_bytes()
        report.rss_before_mib, report.rss_after_mib = before / 2 ** 20, after / 2 ** 20
        report.rss_growth_pct = 100.0 * (after - before) / before
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per run (users add 0-2)")
    parser.add_argument("--url", help="a running app (default: start one on loopback)")
    parser.add_argument("--checkpoints", help="model folder (default: ./checkpoints, stand-ins for missing models)")
    parser.add_argument("--warmup", type=int, default=2, help="concurrent rounds before the memory baseline")
    parser.add_argument("--max-growth", type=float, default=10.0, help="fail at this RSS growth or more, percent")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="explore-load-") as tmp:
        tmp = Path(tmp)
        if args.url:
            report = load_test(args.url, args.clients, args.rounds, args.steps, downloads=tmp / "downloads",
                               warmup=args.warmup)
        else:
            checkpoints = Path(args.checkpoints) if args.checkpoints else _checkpoints(tmp / "checkpoints")
            with serve(checkpoints, tmp / "server") as server:
                report = load_test(server.url, args.clients, args.rounds, args.steps, server,
                                   tmp / "downloads", warmup=args.warmup)
    print(report.summary())
    for error in report.errors[:20]:
        print("  error:", error)
    if args.json:
        data = asdict(report)
        data["latencies"] = [round(v, 3) for v in data["latencies"]]
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    ok = (report.completed == report.runs == report.identical_to_solo == report.own_state
          and (args.url or report.rss_growth_pct < args.max_growth))
    return 0 if ok else 1


def _checkpoints(folder: Path) -> Path:
    """The repository's models, with random-weight stand-ins for any that are missing (as the tests do)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import populate
    return populate(folder)


if __name__ == "__main__":
    sys.exit(main())
