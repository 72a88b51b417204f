"""Turn raw points into the ratios and headline numbers people actually read.

Why ratios: absolute req/s on a shared 2-core VM drift by tens of percent
between runs; "served / floor at the same concurrency, measured minutes apart"
and "batching on / off" are stable enough to compare across days.
"""

from __future__ import annotations

from typing import Any

from benchmarks.scenarios import FRONTEND_CONCURRENCY, FRONTEND_SERIES, PEER_VERSION

Point = dict[str, Any]


def closed(points: list[Point]) -> list[Point]:
    """The closed-loop points (wrk at a fixed number of connections)."""
    return [p for p in points if p.get("loop", "closed") == "closed"]


def _find(points: list[Point], scenario: str, concurrency: int) -> Point | None:
    for point in closed(points):
        if point["scenario"] == scenario and point["concurrency"] == concurrency:
            return point if point.get("rps") is not None else None
    return None


def _div(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def against_reference(points: list[Point], concurrency: int | None = None) -> list[tuple[Point, Point]]:
    """Each measured closed-loop point that names a reference scenario, with the reference's point at
    the same concurrency where that was measured too (only at ``concurrency`` when given)."""
    pairs = []
    for point in closed(points):
        if not point.get("reference") or point.get("rps") is None:
            continue
        if concurrency is not None and point["concurrency"] != concurrency:
            continue
        reference = _find(points, point["reference"], point["concurrency"])
        if reference is not None:
            pairs.append((point, reference))
    return pairs


def offline_b32(offline: dict[str, Any], key: str) -> float | None:
    """Offline batch-32 rows/s for ``model:version``, or None if not measured."""
    entry = offline.get("models", {}).get(key, {})
    return entry.get("batch_32", {}).get("rows_per_s")


def add_ratios(points: list[Point], offline: dict[str, Any]) -> None:
    """Annotate each mlserve point in place with its three ratios.

    * ``vs_floor``: served req/s / floor req/s at the same concurrency.
    * ``on_off``: batching-on req/s / batching-off req/s (on rows only).
    * ``vs_offline_b32``: served rows/s / offline batch-32 rows/s (1 row/request).
    * ``vs_peer``: mlserve's batching-on req/s / MLServer's on the same model, when it ran.
    * ``vs_cache_off``: a cache scenario's req/s / the same model's with the cache off (``VERSION-on``, or
      ``VERSION-feN`` for a cache scenario on N front ends).
    * ``vs_reference``, ``p50_vs_reference``, ``p99_vs_reference``: req/s, p50 and p99 over those of
      the scenario's reference (the same model served the plain way), when it names one;
      ``rows_vs_reference`` too, rows/s over rows/s, when either sends more than one row a request.
    """
    for point in closed(points):
        ratios: dict[str, float | None] = {"vs_floor": None, "on_off": None, "vs_offline_b32": None,
                                           "vs_peer": None}
        if point.get("rps") is not None and point["kind"] != "floor":
            c = point["concurrency"]
            floor = _find(points, "floor", c)
            ratios["vs_floor"] = _div(point["rps"], floor["rps"] if floor else None)
            if point["batching"] and point["kind"] == "mlserve":
                off = _find(points, point["scenario"].removesuffix("-on") + "-off", c)
                ratios["on_off"] = _div(point["rps"], off["rps"] if off else None)
                peer = _find(points, f"mlserver-{point['version']}", c)
                ratios["vs_peer"] = _div(point["rps"], peer["rps"] if peer else None)
            if point.get("cache"):
                front_ends = point.get("frontends", 1)
                cache_off = f"{point['version']}-on" if front_ends == 1 else f"{point['version']}-fe{front_ends}"
                off = _find(points, cache_off, c)
                ratios["vs_cache_off"] = _div(point["rps"], off["rps"] if off else None)
            key = f"{point.get('model', 'iris_classifier')}:{point['version']}"
            ratios["vs_offline_b32"] = _div(point["rps"], offline_b32(offline, key))
        point["ratios"] = {k: (round(v, 4) if v is not None else None) for k, v in ratios.items()}
    for point, reference in against_reference(points):
        for prefix, key in (("", "rps"), ("p50_", "p50_ms"), ("p99_", "p99_ms")):
            ratio = _div(point[key], reference[key])
            point["ratios"][f"{prefix}vs_reference"] = round(ratio, 4) if ratio is not None else None
        rows, reference_rows = point.get("rows_per_request", 1), reference.get("rows_per_request", 1)
        if rows != 1 or reference_rows != 1:
            ratio = _div(point["rps"] * rows, reference["rps"] * reference_rows)
            point["ratios"]["rows_vs_reference"] = round(ratio, 4) if ratio is not None else None


def open_loop_tails(points: list[Point]) -> list[dict[str, Any]]:
    """Each open-loop point measured at another scenario's arrival rates (the floor at v1-on's) beside
    that scenario's point at the same rate, with the p99 ratio.

    Why at the same rate rather than each at its own capacity's: at one arrival rate the floor's tail is
    what aiohttp, the generator and this machine cost anyway, so the ratio is what serving the model adds.
    """
    rows: list[dict[str, Any]] = []
    measured = [p for p in points if p.get("loop") == "open" and p.get("rps") is not None]
    for floor in measured:
        if floor.get("rates_of") in (None, floor["scenario"]):
            continue
        for point in measured:
            if point["scenario"] == floor["rates_of"] and point.get("fraction") == floor.get("fraction"):
                ratio = _div(point["p99_ms"], floor["p99_ms"])
                rows.append({
                    "scenario": point["scenario"],
                    "floor": floor["scenario"],
                    "fraction": point["fraction"],
                    "target_rps": point["target_rps"],
                    "rps": round(point["rps"], 1),
                    "floor_rps": round(floor["rps"], 1),
                    "p50_ms": point["p50_ms"],
                    "floor_p50_ms": floor["p50_ms"],
                    "p99_ms": point["p99_ms"],
                    "floor_p99_ms": floor["p99_ms"],
                    "p99_vs_floor": round(ratio, 3) if ratio is not None else None,
                    "generator": point.get("generator", "openloop"),
                })
    return sorted(rows, key=lambda row: (row["scenario"], row["fraction"]))


def frontend_rows(points: list[Point]) -> list[dict[str, Any]]:
    """The front-ends table: every measured point at 64 connections of the floor or of plain v1 (any front
    ends, either executor), by line then front ends, each with its req/s over the single-process floor's.

    Why over the single-process floor rather than the floor at as many processes: one aiohttp process is
    the ceiling more front ends are meant to lift, so the ratio says how far above it they got; the floor's
    own processes are rows of their own, the most as many processes could give.
    """
    at = [p for p in closed(points) if p.get("frontend_series") and p["concurrency"] == FRONTEND_CONCURRENCY
          and p.get("rps") is not None]
    single = next((p for p in at if p["frontend_series"] == "floor" and p.get("frontends", 1) == 1), None)
    rows = []
    for p in sorted(at, key=lambda p: (FRONTEND_SERIES.index(p["frontend_series"]), p.get("frontends", 1))):
        ratio = _div(p["rps"], single["rps"] if single else None)
        rows.append({
            "scenario": p["scenario"],
            "series": p["frontend_series"],
            "frontends": p.get("frontends", 1),
            "executor": p.get("executor"),
            "rps": round(p["rps"], 1),
            "vs_single_floor": round(ratio, 4) if ratio is not None else None,
            "p50_ms": p["p50_ms"],
            "p99_ms": p["p99_ms"],
            "non2xx": p["non2xx"],
            "server_cpu_pct": p.get("server_cpu_pct"),
            "other_cpu_pct": p.get("other_cpu_pct"),
        })
    return rows


HALF = 0.5
"""The open-loop fraction of capacity the headline reads the tails at."""


def headline(points: list[Point]) -> dict[str, Any]:
    """The few numbers the markdown leads with (None where not measured)."""
    v1 = _find(points, "v1-on", 64)
    floor64 = _find(points, "floor", 64)
    v2 = _find(points, "v2-on", 64)
    v2_off = _find(points, "v2-off", 64)
    image = _find(points, "image-on", 64)
    out: dict[str, Any] = {
        "v1_at_64": None,
        "v2_at_64": None,
        "image_at_64": None,
        "c1_p50_on_vs_off": {},
        "vs_peer_at_64": {},
        "vs_reference_at_64": {},
        "open_loop_p99_vs_floor_at_half": [row for row in open_loop_tails(points) if row["fraction"] == HALF],
        # What more front ends (or batches in the front end) buy v1, against one aiohttp process.
        "frontends_at_64": [row for row in frontend_rows(points) if row["series"] != "floor"
                            and (row["frontends"] > 1 or row["executor"] != "pool")],
    }
    for point, reference in against_reference(points, 64):
        out["vs_reference_at_64"][point["scenario"]] = {
            "reference": reference["scenario"],
            **{f"{prefix}{key}": round(p[key], 2) for prefix, p in (("", point), ("ref_", reference))
               for key in ("rps", "p50_ms", "p99_ms")},
            **{key: point["ratios"].get(key) for key in ("vs_reference", "p50_vs_reference", "p99_vs_reference",
                                                         "rows_vs_reference")},
            "rows_per_request": point.get("rows_per_request", 1),
            "ref_rows_per_request": reference.get("rows_per_request", 1),
        }
    for version, ours_name in (("v1", "v1-on"), ("v2", "v2-on"), ("v1", "v1-v2"), ("v2", "v2-v2")):
        ours, peer = _find(points, ours_name, 64), _find(points, f"mlserver-{version}", 64)
        if ours and peer:
            name = version if ours_name.endswith("-on") else f"{version} via /v2 (MLServer's protocol)"
            out["vs_peer_at_64"][name] = {
                "rps": round(ours["rps"], 1),
                "peer_rps": round(peer["rps"], 1),
                "ratio": round(ours["rps"] / peer["rps"], 2),
                "p99_ms": round(ours["p99_ms"], 2),
                "peer_p99_ms": round(peer["p99_ms"], 2),
            }
    if image:
        ratios = image.get("ratios", {})
        out["image_at_64"] = {
            "rps": round(image["rps"], 1),
            "p99_ms": round(image["p99_ms"], 2),
            "vs_offline_b32": ratios.get("vs_offline_b32"),
            "on_off": ratios.get("on_off"),
        }
    if v1:
        out["v1_at_64"] = {
            "rps": round(v1["rps"], 1),
            "floor_rps": round(floor64["rps"], 1) if floor64 else None,
            "pct_of_floor": round(100 * v1["rps"] / floor64["rps"], 1) if floor64 else None,
            "p99_ms": round(v1["p99_ms"], 2),
        }
    if v2:
        out["v2_at_64"] = {
            "rps": round(v2["rps"], 1),
            "p99_ms": round(v2["p99_ms"], 2),
            "off_rps": round(v2_off["rps"], 1) if v2_off else None,
            "on_off": round(v2["rps"] / v2_off["rps"], 2) if v2_off else None,
        }
    for version in ("v1", "v2", "image"):
        on = _find(points, f"{version}-on", 1)
        off = _find(points, f"{version}-off", 1)
        if on and off:
            out["c1_p50_on_vs_off"][version] = {
                "on_ms": round(on["p50_ms"], 3),
                "off_ms": round(off["p50_ms"], 3),
                "diff_ms": round(on["p50_ms"] - off["p50_ms"], 3),
            }
    return out


def times(ratio: float | None) -> str:
    """A ratio as ``0.973x``, or ``–`` where it could not be taken."""
    return "–" if ratio is None else f"{ratio:.3f}x"


def headline_lines(head: dict[str, Any]) -> list[str]:
    """Human sentences for the headline dict; shared by the markdown and stdout."""
    lines: list[str] = []
    v1 = head.get("v1_at_64")
    if v1:
        pct = f"{v1['pct_of_floor']:.1f}% of HTTP floor ({v1['floor_rps']:.0f} req/s)" if (
            v1["pct_of_floor"] is not None
        ) else "floor not measured"
        lines.append(
            f"v1 (batching on) @ c=64: {v1['rps']:.0f} req/s = {pct}, p99 {v1['p99_ms']:.1f} ms"
        )
    v2 = head.get("v2_at_64")
    if v2:
        onoff = f"{v2['on_off']:.2f}x vs batching off ({v2['off_rps']:.0f} req/s)" if (
            v2["on_off"] is not None
        ) else "batching off not measured"
        lines.append(
            f"v2 (batching on) @ c=64: {v2['rps']:.0f} req/s, p99 {v2['p99_ms']:.1f} ms, {onoff}"
        )
    image = head.get("image_at_64")
    if image:
        ceiling = image["vs_offline_b32"]
        lines.append(
            f"image (batching on) @ c=64: {image['rps']:.0f} images/s, p99 {image['p99_ms']:.1f} ms"
            + (f", {100 * ceiling:.0f}% of one process's offline batch-32 pipeline" if ceiling else "")
            + (f", {image['on_off']:.2f}x batching off" if image["on_off"] else "")
        )
    for d in head.get("open_loop_p99_vs_floor_at_half", []):
        lines.append(
            f"{d['scenario']} open loop at {d['target_rps']:.0f} req/s (half its capacity, {d['generator']}): "
            f"p99 {d['p99_ms']:.2f} ms vs {d['floor']} {d['floor_p99_ms']:.2f} ms at that rate "
            f"({times(d['p99_vs_floor'])})"
        )
    for d in head.get("frontends_at_64", []):
        floor = "single-process floor not measured" if d["vs_single_floor"] is None else (
            f"{times(d['vs_single_floor'])} the single-process floor")
        lines.append(
            f"{d['scenario']} ({d['frontends']} front end{'s' if d['frontends'] > 1 else ''}, {d['executor']} "
            f"executor) @ c=64: {d['rps']:.0f} req/s = {floor}, p99 {d['p99_ms']:.1f} ms"
        )
    for version, d in head.get("c1_p50_on_vs_off", {}).items():
        lines.append(
            f"{version} @ c=1 p50: batching on {d['on_ms']:.2f} ms vs off {d['off_ms']:.2f} ms "
            f"({d['diff_ms']:+.2f} ms)"
        )
    for version, d in head.get("vs_peer_at_64", {}).items():
        lines.append(
            f"{version} @ c=64 against MLServer {PEER_VERSION}: {d['rps']:.0f} vs {d['peer_rps']:.0f} req/s "
            f"({d['ratio']:.2f}x), p99 {d['p99_ms']:.1f} vs {d['peer_p99_ms']:.1f} ms"
        )
    for name, d in head.get("vs_reference_at_64", {}).items():
        lines.append(
            f"{name} / {d['reference']} @ c=64: {d['rps']:.0f} vs {d['ref_rps']:.0f} req/s "
            f"({times(d['vs_reference'])}), "
            f"p50 {d['p50_ms']:.2f} vs {d['ref_p50_ms']:.2f} ms ({times(d['p50_vs_reference'])}), "
            f"p99 {d['p99_ms']:.2f} vs {d['ref_p99_ms']:.2f} ms ({times(d['p99_vs_reference'])})"
            + (f"; rows/s {d['rps'] * d['rows_per_request']:.0f} vs {d['ref_rps'] * d['ref_rows_per_request']:.0f} "
               f"({times(d['rows_vs_reference'])})" if d.get("rows_vs_reference") is not None else "")
        )
    return lines
