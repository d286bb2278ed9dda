"""A progress bar as HTML, updated with each preview (Gradio's own overlay hides streamed outputs)."""
from __future__ import annotations


def bar(done: int, total: int) -> str:
    """An accessible <div> bar, done / total filled."""
    pct = 0.0 if total <= 0 else max(0.0, min(100.0, 100.0 * done / total))
    return (f'<div class="run-progress" role="progressbar" aria-valuemin="0" aria-valuemax="{total}" '
            f'aria-valuenow="{done}"><div class="run-progress-fill" style="width: {pct:.1f}%"></div></div>')
