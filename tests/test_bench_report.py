"""The benchmark report is rendered from its JSON: targets with verdicts, and re-run workloads named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from explore import bench

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.json"


def test_report_renders_the_committed_results_and_names_re_runs():
    results = json.loads(REPORT.read_text())
    text = bench.report(results)
    assert text.startswith("# Benchmarks") and "| target | measured | verdict |" in text
    assert "engine time" in text
    results["rerun"] = {"app": "2026-12-07 05:00 UTC"}
    assert "Re-run later with `--only ... --update` (same machine): app on 2026-12-07 05:00 UTC." in \
        bench.report(results)


def test_update_needs_only():
    with pytest.raises(SystemExit):
        bench.main(["--update"])
