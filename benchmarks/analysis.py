"""Turn raw points into the ratios and headline numbers people actually read.

Why ratios: absolute req/s on a shared 2-core VM drift by tens of percent
between runs; "served / floor at the same concurrency, measured minutes apart"
and "batching on / off" are stable enough to compare across days.
"""

from __future__ import annotations

from typing import Any

Point = dict[str, Any]


def _find(points: list[Point], scenario: str, concurrency: int) -> Point | None:
    for point in points:
        if point["scenario"] == scenario and point["concurrency"] == concurrency:
            return point if point.get("rps") is not None else None
    return None


def _div(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def offline_b32(offline: dict[str, Any], version: str) -> float | None:
    """Offline batch-32 rows/s for ``version``, or None if not measured."""
    entry = offline.get("versions", {}).get(version, {})
    return entry.get("batch_32", {}).get("rows_per_s")


def add_ratios(points: list[Point], offline: dict[str, Any]) -> None:
    """Annotate each mlserve point in place with its three ratios.

    * ``vs_floor``: served req/s / floor req/s at the same concurrency.
    * ``on_off``: batching-on req/s / batching-off req/s (on rows only).
    * ``vs_offline_b32``: served rows/s / offline batch-32 rows/s (1 row/request).
    """
    for point in points:
        ratios: dict[str, float | None] = {"vs_floor": None, "on_off": None, "vs_offline_b32": None}
        if point.get("rps") is not None and point["kind"] == "mlserve":
            c = point["concurrency"]
            floor = _find(points, "floor", c)
            ratios["vs_floor"] = _div(point["rps"], floor["rps"] if floor else None)
            if point["batching"]:
                off = _find(points, f"{point['version']}-off", c)
                ratios["on_off"] = _div(point["rps"], off["rps"] if off else None)
            ratios["vs_offline_b32"] = _div(point["rps"], offline_b32(offline, point["version"]))
        point["ratios"] = {k: (round(v, 4) if v is not None else None) for k, v in ratios.items()}


def headline(points: list[Point]) -> dict[str, Any]:
    """The few numbers the markdown leads with (None where not measured)."""
    v1 = _find(points, "v1-on", 64)
    floor64 = _find(points, "floor", 64)
    v2 = _find(points, "v2-on", 64)
    v2_off = _find(points, "v2-off", 64)
    out: dict[str, Any] = {
        "v1_at_64": None,
        "v2_at_64": None,
        "c1_p50_on_vs_off": {},
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
    for version in ("v1", "v2"):
        on = _find(points, f"{version}-on", 1)
        off = _find(points, f"{version}-off", 1)
        if on and off:
            out["c1_p50_on_vs_off"][version] = {
                "on_ms": round(on["p50_ms"], 3),
                "off_ms": round(off["p50_ms"], 3),
                "diff_ms": round(on["p50_ms"] - off["p50_ms"], 3),
            }
    return out


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
    for version, d in head.get("c1_p50_on_vs_off", {}).items():
        lines.append(
            f"{version} @ c=1 p50: batching on {d['on_ms']:.2f} ms vs off {d['off_ms']:.2f} ms "
            f"({d['diff_ms']:+.2f} ms)"
        )
    return lines
