"""CLI: ``python -m benchmarks [--quick] [--scenarios ...] [--concurrency ...]``.

Why a thin CLI: all decisions (what to run, how long) are made here and
printed with a time estimate before any process starts, so a mistyped filter
or a missing tool fails in a second, not minutes into a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from benchmarks import peers, scenarios, servers
from benchmarks.runner import Plan, run
from benchmarks.wrk_runner import WRK2_ENV, find_wrk2, wrk_available

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark mlserve against an HTTP floor, batching on/off and an "
        "offline compute ceiling, all in one run.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="short durations for a ~1-2 minute smoke run")
    parser.add_argument("--scenarios", default=None,
                        help="comma-separated names or globs from: "
                        + ", ".join(s.name for s in scenarios.CATALOGUE) + " (default: all)")
    parser.add_argument("--peers", action="store_true",
                        help="compare with MLServer " + scenarios.PEER_VERSION + " (run `make bench-peers` once "
                        "to make its venv): floor, v1-on and v2-on beside the peer scenarios")
    parser.add_argument("--concurrency", default=None,
                        help="comma-separated closed-loop connection counts (default: "
                        + ",".join(map(str, scenarios.DEFAULT_CONCURRENCY)) + ")")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per measured point (default 10, quick 3)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="warm-up seconds before each point (default 2, quick 1)")
    parser.add_argument("--open-loop-duration", type=float, default=None,
                        help="measured seconds per open-loop point (default 6, quick 2)")
    parser.add_argument("--wrk2", default=None, metavar="PATH",
                        help=f"wrk2 for the open-loop points (default: ${WRK2_ENV}, else wrk2 on PATH, else "
                        "where the shared tools' build-wrk2.sh leaves it); without one, benchmarks/openloop.py")
    parser.add_argument("--no-wrk2", action="store_true",
                        help="run the open-loop points on benchmarks/openloop.py even where wrk2 is found")
    parser.add_argument("--workers", type=int, default=2,
                        help="mlserve --workers (model worker processes; default 2)")
    parser.add_argument("--floor-workers", type=int, default=1,
                        help="HTTP floor processes (default 1: the ceiling of one aiohttp process)")
    parser.add_argument("--frontends", default=None, metavar="N,N,...",
                        help="front-end counts to sweep, e.g. 1,2,4: per count, at "
                        f"{scenarios.FRONTEND_CONCURRENCY} connections, v1 on that many mlserve front ends with "
                        "the worker pool (v1-feN) and with the inline executor (v1-feN-inline), and the floor at "
                        "that many processes (floor-feN); each needs --workers >= N")
    parser.add_argument("--wrk-core", type=int, default=1,
                        help="CPU core wrk is pinned to with taskset; -1 disables pinning")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="reuse/train models here instead of a temp dir")
    parser.add_argument("--mlserve", default=None,
                        help="mlserve command line (default: .venv/bin/mlserve), e.g. "
                        "'python -m mlserve' or an installed release to compare with")
    parser.add_argument("--baseline", default=None,
                        help="another mlserve command line (a build of the code before a change); each chosen "
                        "mlserve scenario also runs on it, in the same run, as NAME@baseline")
    parser.add_argument("--closed-only", action="store_true", help="skip the open-loop points")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline ceiling")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                        help=f"where results go (default {RESULTS_DIR})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        chosen = scenarios.select(args.scenarios, peers=args.peers)
        concurrency = scenarios.parse_concurrency(args.concurrency)
        sweep = scenarios.parse_counts(args.frontends, "--frontends") if args.frontends else []
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if sweep and sweep[-1] > args.workers:
        print(f"error: --frontends {sweep[-1]} needs --workers >= {sweep[-1]} (each front end gets a worker of "
              f"its own), got --workers {args.workers}", file=sys.stderr)
        return 2
    if not wrk_available():
        print("error: wrk not found; install it: apt-get update && apt-get install -y wrk",
              file=sys.stderr)
        return 2
    try:
        wrk2 = None if args.no_wrk2 else find_wrk2(args.wrk2)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    notes: list[str] = []
    chosen = [dataclasses.replace(s, frontends=args.floor_workers) if s.kind == "floor" else s for s in chosen]
    chosen = scenarios.with_frontends(chosen, sweep, concurrency)
    crowded = [s.name for s in chosen if s.kind == "mlserve" and s.frontends > args.workers]
    if crowded:
        # mlserve would give each front end a worker anyway: more workers than the run says it measures.
        note = f"{', '.join(crowded)} skipped: more front ends than --workers {args.workers}"
        print(f"warning: {note}", file=sys.stderr)
        notes.append(note)
        chosen = [s for s in chosen if s.name not in crowded]
    mlserve_cmd = servers.mlserve_command(args.mlserve)
    wants_mlserve = any(s.kind == "mlserve" for s in chosen)
    if wants_mlserve and (mlserve_cmd is None or not servers.mlserve_serve_works(mlserve_cmd)):
        why = "not installed" if mlserve_cmd is None else "`serve --help` fails"
        note = f"mlserve CLI {why}: mlserve scenarios skipped, floor only"
        print(f"warning: {note}", file=sys.stderr)
        notes.append(note)
        chosen = [s for s in chosen if s.kind != "mlserve"]
        mlserve_cmd = None
    if not chosen:
        print("error: nothing left to run", file=sys.stderr)
        return 2
    if args.mlserve:
        notes.append(f"mlserve command overridden: {args.mlserve}")
    if args.closed_only:
        chosen = [dataclasses.replace(s, closed_only=True) for s in chosen]
    baseline_cmd = servers.mlserve_command(args.baseline) if args.baseline else None
    if baseline_cmd is not None:
        chosen = scenarios.with_baseline(chosen)
        notes.append(f"baseline build: {args.baseline}")
    peer_cmd = peers.command()
    if peer_cmd is None and any(s.kind == "mlserver" for s in chosen):
        print(f"error: MLServer is not installed in {peers.VENV}; run `make bench-peers`",
              file=sys.stderr)
        return 2

    timing = scenarios.Timing.default(args.quick)
    timing = scenarios.Timing(
        duration_s=args.duration if args.duration is not None else timing.duration_s,
        warmup_s=args.warmup if args.warmup is not None else timing.warmup_s,
        offline_s=timing.offline_s,
        open_loop_s=args.open_loop_duration if args.open_loop_duration is not None else timing.open_loop_s,
    )
    run_offline = not args.no_offline and (mlserve_cmd is not None or args.models_dir is not None)
    plan = Plan(
        scenarios=chosen,
        concurrency=concurrency,
        timing=timing,
        quick=args.quick,
        workers=args.workers,
        floor_workers=args.floor_workers,
        wrk_core=None if args.wrk_core < 0 else args.wrk_core,
        out_dir=args.out_dir,
        models_dir=args.models_dir,
        mlserve_cmd=mlserve_cmd,
        run_offline=run_offline,
        baseline_cmd=baseline_cmd,
        peer_cmd=peer_cmd,
        notes=notes,
        wrk2=wrk2,
    )
    est = scenarios.estimate_seconds(chosen, concurrency, timing, run_offline)
    print(
        f"mlserve bench: {len(chosen)} scenario(s) [{', '.join(s.name for s in chosen)}] x "
        f"c={','.join(map(str, concurrency))}, {timing.duration_s:g}s + {timing.warmup_s:g}s "
        f"warm-up per point, ~{est / 60:.1f} min estimated on {os.cpu_count()} CPUs",
        flush=True,
    )
    if scenarios.open_loop_runs(chosen):
        print(f"open-loop points on {f'wrk2 ({wrk2})' if wrk2 else 'benchmarks/openloop.py (no wrk2)'}", flush=True)
    record = run(plan)
    return 130 if record.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
