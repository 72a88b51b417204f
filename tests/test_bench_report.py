"""The benchmark's front-ends sweep and its table: which scenarios a sweep adds, and what the report reads.

The front-ends figures are ratios over the single-process floor of the same run, so a row read against
the wrong floor, or a point of another configuration taken for a front-end one, would be a wrong
headline; and a sweep that starts a server twice for the same point costs minutes of every run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from benchmarks import analysis, report, scenarios, servers
from benchmarks.runner import _point_header
from benchmarks.scenarios import Scenario, frontend_scenario

ALL = list(scenarios.DEFAULT_CONCURRENCY)


def _point(scenario: Scenario, rps: float | None, concurrency: int = 64) -> dict[str, Any]:
    """A measured closed-loop point as the runner records it (its header and wrk's figures)."""
    figures = {"rps": rps, "p50_ms": 8.0, "p99_ms": 20.0, "non2xx": 0, "socket_errors": 0,
               "loadgen_cpu_pct": 50.0, "server_cpu_pct": 120.0, "frontend_cpu_pct": 1.0, "other_cpu_pct": 3.0}
    if rps is None:
        figures = {"rps": None, "error": "server did not start"}
    return _point_header(scenario, concurrency) | figures


def _by_name(name: str) -> Scenario:
    return next(s for s in scenarios.CATALOGUE if s.name == name)


def _sweep_points() -> list[dict[str, Any]]:
    floor, v1 = _by_name("floor"), _by_name("v1-on")
    return [
        _point(v1, 4000.0, concurrency=16),  # not at 64: not a row
        _point(frontend_scenario("inline", 2), 9000.0),
        _point(v1, 7000.0),
        _point(frontend_scenario("pool", 4), None),  # failed: not a row
        _point(_by_name("v1-cache-hit"), 12000.0),  # another configuration: not a row
        _point(frontend_scenario("floor", 2), 15000.0),
        _point(frontend_scenario("pool", 2), 9500.0),
        _point(floor, 8000.0),
    ]


def test_rows_are_the_floor_and_plain_v1_at_64_by_line_then_front_ends_over_the_one_process_floor() -> None:
    rows = analysis.frontend_rows(_sweep_points())

    assert [(r["scenario"], r["series"], r["frontends"], r["executor"]) for r in rows] == [
        ("floor", "floor", 1, None),
        ("floor-fe2", "floor", 2, None),
        ("v1-on", "pool", 1, "pool"),
        ("v1-fe2", "pool", 2, "pool"),
        ("v1-fe2-inline", "inline", 2, "inline"),
    ]
    assert [r["vs_single_floor"] for r in rows] == [1.0, 1.875, 0.875, 1.1875, 1.125]


def test_without_a_one_process_floor_there_is_no_ratio_and_the_table_says_so() -> None:
    points = [p for p in _sweep_points() if p["scenario"] != "floor"]

    rows = analysis.frontend_rows(points)
    table = "\n".join(report.frontends_table(rows))

    assert [r["vs_single_floor"] for r in rows] == [None] * 4
    assert "| v1-fe2 | 2 | pool | 9500 | – | 8.00 | 20.00 | 0 | 120% | 3% |" in table


def test_the_table_and_the_headline_show_each_front_end_point() -> None:
    points = _sweep_points()
    analysis.add_ratios(points, {})

    table = report.frontends_table(analysis.frontend_rows(points))
    lines = analysis.headline_lines(analysis.headline(points))

    assert table[0] == "## Front ends (64 connections)"
    assert "| v1-fe2-inline | 2 | inline | 9000 | 1.125x | 8.00 | 20.00 | 0 | 120% | 3% |" in table
    assert "| floor | 1 | – | 8000 | 1.000x | 8.00 | 20.00 | 0 | 120% | 3% |" in table
    fronts = [line for line in lines if "front end" in line]
    assert fronts == [
        "v1-fe2 (2 front ends, pool executor) @ c=64: 9500 req/s = 1.188x the single-process floor, p99 20.0 ms",
        "v1-fe2-inline (2 front ends, inline executor) @ c=64: 9000 req/s = 1.125x the single-process floor, "
        "p99 20.0 ms",
    ]
    assert report.frontends_table([]) == []


def test_the_plot_is_drawn_from_the_rows(tmp_path: Path) -> None:
    points = _sweep_points()
    run = {"date": "2026-01-01", "config": {"quick": True}, "points": points,
           "frontends": analysis.frontend_rows(points)}

    report.plot_frontends(run, tmp_path / "frontends.png")

    assert (tmp_path / "frontends.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_plain_v1_and_the_floor_are_front_end_points() -> None:
    series = {s.name: s.frontend_series for s in scenarios.CATALOGUE}

    assert {name for name, line in series.items() if line} == {"floor", "v1-on", "v1-fe2", "v1-fe2-inline"}
    assert series["v1-fe2-inline"] == "inline"
    baseline = scenarios.with_baseline([_by_name("v1-fe2")])[1]
    assert baseline.name == "v1-fe2@baseline" and baseline.frontend_series is None


def test_a_front_end_scenario_asks_for_its_front_ends_and_executor() -> None:
    inline = frontend_scenario("inline", 4)

    assert (inline.name, inline.points, inline.closed_only) == ("v1-fe4-inline", (64,), True)
    assert inline.env == {"MLSERVE_BATCHING__EXECUTOR": "inline"}
    assert frontend_scenario("pool", 4).env == {}
    argv = servers.mlserve_argv(["mlserve"], 8000, Path("models"), 4, inline.frontends)
    assert argv[-4:] == ["--workers", "4", "--frontends", "4"]
    # One front end is the flag left out, so a baseline build from before it still starts.
    assert "--frontends" not in servers.mlserve_argv(["mlserve"], 8000, Path("models"), 2, 1)


def test_a_sweep_adds_each_count_once_after_the_front_end_scenarios_already_chosen() -> None:
    chosen = scenarios.select("floor,v1-on,v1-fe2*,v2-on")

    swept = scenarios.with_frontends(chosen, [1, 2, 4], ALL)

    assert [s.name for s in swept] == ["floor", "v1-on", "v1-fe2", "v1-fe2-inline", "v1-fe1-inline",
                                       "floor-fe2", "floor-fe4", "v1-fe4", "v1-fe4-inline", "v2-on"]
    assert scenarios.with_frontends(chosen, [], ALL) == chosen


def test_a_sweep_measures_the_one_process_points_itself_where_the_run_does_not_at_64() -> None:
    floor_pair = [dataclasses.replace(_by_name("floor"), frontends=2), _by_name("v1-on")]

    swept = scenarios.with_frontends(floor_pair, [1], [1, 16])

    assert [s.name for s in swept] == ["floor", "v1-on", "floor-fe1", "v1-fe1", "v1-fe1-inline"]


def test_front_end_counts_are_parsed_like_concurrency() -> None:
    assert scenarios.parse_counts("4,1,2,2", "--frontends") == [1, 2, 4]
    for bad in ("0,2", "two", ","):
        with pytest.raises(ValueError, match="--frontends"):
            scenarios.parse_counts(bad, "--frontends")


def test_a_cache_scenario_on_two_front_ends_is_read_against_two_front_ends_with_the_cache_off() -> None:
    points = [_point(_by_name("floor"), 8000.0), _point(_by_name("v1-on"), 6000.0),
              _point(frontend_scenario("pool", 2), 9000.0), _point(_by_name("v1-cache-miss"), 5400.0),
              _point(_by_name("v1-cache-miss-fe2"), 8100.0), _point(_by_name("v1-cache-hit-fe2"), 12000.0)]
    analysis.add_ratios(points, {})
    ratios = {p["scenario"]: p["ratios"] for p in points if p["scenario"].startswith("v1-cache")}
    assert ratios["v1-cache-miss"]["vs_cache_off"] == 0.9, "one front end: against v1-on"
    assert ratios["v1-cache-miss-fe2"]["vs_cache_off"] == 0.9, "two: against v1-fe2"
    assert ratios["v1-cache-hit-fe2"]["vs_floor"] == 1.5, "the floor is the single-process one"
