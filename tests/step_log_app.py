"""`python app.py` with a step log, for tests/test_load.py: `python tests/step_log_app.py [app.py's arguments]`.

Every sampler step the server computes appends one line `<time.time()> <step index>` to the file named by
EXPLORE_TEST_STEP_LOG, written when the step leaves the sampler loop (explore.engine.Plan.steps, which every
handler iterates), so a test can count the steps computed after a cancel or a closed connection. The hook
lives here, in the test's launcher; the library has none.

While the file named by EXPLORE_TEST_STEP_PACE exists, each step lasts at least the seconds it holds (the
remainder slept after the step, outside the sampler): a test can make a step outlast the time the server takes
to notice a cancel (its request over HTTP, the handler's poll), so that "steps computed after the cancel"
counts the same on a fast idle machine and on a slow busy one.
"""
from __future__ import annotations

import functools
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pace(pace_path: str | None) -> float:
    """The minimum seconds per step now (0 without a pace file)."""
    try:
        return float(Path(pace_path).read_text()) if pace_path else 0.0
    except (OSError, ValueError):
        return 0.0


def install(log_path: str, pace_path: str | None = None) -> None:
    """Wrap Plan.steps: the same steps, one log line each before it is handed on."""
    from explore import engine

    original = engine.Plan.steps

    @functools.wraps(original)
    def steps(self, should_stop=None):
        started = time.monotonic()
        for step in original(self, should_stop):
            with open(log_path, "a") as f:
                f.write(f"{time.time():.6f} {step.index}\n")
            time.sleep(max(0.0, started + pace(pace_path) - time.monotonic()))
            yield step
            started = time.monotonic()

    engine.Plan.steps = steps


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    install(os.environ["EXPLORE_TEST_STEP_LOG"], os.environ.get("EXPLORE_TEST_STEP_PACE"))
    sys.argv = [str(ROOT / "app.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
