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


def test_paired_overhead_is_the_median_of_back_to_back_ratios():
    # the machine slows down 2x half-way: the ratio of medians sees noise, each pair still sees +10%
    slower = {"median_s": 1.65, "samples_s": [1.1, 1.1, 2.2, 2.2, 2.2]}
    faster = {"median_s": 1.5, "samples_s": [1.0, 1.0, 2.0, 2.0, 2.0]}
    assert bench.paired_overhead(slower, faster) == pytest.approx(0.10)
    # one pair caught by a stall: the median ignores it
    assert bench.paired_overhead({"samples_s": [1.0, 1.0, 1.05, 4.0, 1.0]},
                                 {"samples_s": [1.0, 1.0, 1.0, 1.0, 1.0]}) == pytest.approx(0.0)
    # samples that were not measured in pairs are refused, not compared
    with pytest.raises(ValueError):
        bench.paired_overhead({"samples_s": [1.0, 1.1]}, {"samples_s": [1.0]})


def test_paired_spread_is_the_middle_half_of_the_ratios():
    ratios = [0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4]  # slower / faster, pair by pair
    spread = bench.paired_spread({"samples_s": ratios}, {"samples_s": [1.0] * len(ratios)})
    assert spread == pytest.approx((-0.1, 0.3))  # quartiles 0.9 and 1.3 (the 'exclusive' method)


def test_the_streaming_paths_row_compares_the_app_with_a_plain_generator_in_rounds():
    results = json.loads(REPORT.read_text())
    paths = results["streaming_paths"]
    assert bench._path_names(paths)[:2] == ["app", "plain"]
    assert len(paths["app"]["samples_s"]) == len(paths["plain"]["samples_s"])  # measured round by round
    assert "the app's streaming path costs <= 5% over a plain generator handler" in bench.report(results)
