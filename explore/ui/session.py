"""Per-user state (one `Session` per browser tab or API client, held in a gr.State)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASKS = ("sample", "compare", "upsample", "pair")


@dataclass
class Session:
    """Stop flags the running computation polls once per step, the last trajectory, lab numbers."""

    stop: dict[str, bool] = field(default_factory=lambda: {task: False for task in TASKS})
    trajectory: Any = None  # explore.ui.trajectory.Trajectory of the last finished (or stopped) run
    lab: dict[str, dict[str, float]] = field(default_factory=dict)  # sharpness numbers per lab panel
    sweep: dict[str, Any] = field(default_factory=dict)  # "row name, column name" -> Recipe of the last comparison

    def start(self, task: str) -> None:
        self.stop[task] = False

    def request_stop(self, task: str) -> None:
        self.stop[task] = True

    def should_stop(self, task: str):
        """A zero-argument callable for Plan.steps(should_stop=...)."""
        return lambda: self.stop[task]


def new_session() -> Session:
    return Session()


def ensure(session: Session | None) -> Session:
    """Handlers called without a state (e.g. in unit tests) get a fresh one."""
    return session if isinstance(session, Session) else Session()
