"""``merge``: the Prometheus text expositions of every front-end process, as one exposition of the
whole server.

Several front-end processes accept on one port, each with its own registry, and a scrape lands on
one of them. That one fetches the exposition of every front end, its own included, and answers
their merge, so a scrape sees the server rather than whichever process the kernel picked.

Series are matched by sample name and label set (as a set: another producer may order labels
differently) and combined into one: summed, or, for the families in ``max_families``, the largest.
Lines are parsed by hand, not by a regex, so quotes, commas and braces inside a label value stay its
own. A line that does not parse is dropped alone: one process's bad line must not cost the scrape.
"""

from __future__ import annotations

import math
import string
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

MAX_FAMILIES: frozenset[str] = frozenset(
    {
        "mlserve_model_info", "mlserve_model_accuracy", "mlserve_model_load_seconds", "mlserve_model_warmup_seconds",
        "mlserve_cache_breaker_open", "mlserve_event_loop_busy_ratio", "mlserve_activations_total",
        "mlserve_model_source_checks_total",
    }
)
"""Families merged by taking the largest value rather than the sum.

Every front end applies the same control-plane change and reports the same state: each lists the
same model versions, reads the same accuracy, times the same load (the slowest worker's), trips its
breaker on the same Redis, counts the same activation and the same look at the model's source.
Summing would count one event or one fact N times. The busiest loop is the one that holds shadow
copies back, so its share is the server's. Everything else is a sum: each front end has its own
batchers, its own share of the workers and its own request counters, so queue depths, live workers,
restarts, counts and histograms of the server are those of its front ends added up."""

_SAMPLES = {
    "counter": ("",), "gauge": ("",), "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
}
"""The suffixes of each kind's sample names: a sample belongs to a family by its TYPE line, never by
a guess at the suffix of an untyped name."""

_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_:")

Number = int | float
LabelSet = frozenset[tuple[str, str]]


@dataclass
class _Family:
    help: str | None = None
    type: str | None = None
    kind: str = "untyped"
    samples: dict[tuple[str, LabelSet], tuple[str, Number]] = field(default_factory=dict)
    """(sample name, label set) to the first-seen text of the sample's name and labels, and its value."""


def merge(expositions: Sequence[str], max_families: Collection[str] = MAX_FAMILIES) -> str:
    """One exposition (format 0.0.4) of every family of ``expositions``, each once, in first-seen order.

    Each family keeps the HELP and TYPE lines of the first exposition that has them. A summary's
    quantiles cannot be merged (the quantile of a union is not a function of the parts' quantiles), so
    each is the largest of the processes': an upper bound, not the server's quantile. Timestamps are
    dropped: the merge is of now.
    """
    families: dict[str, _Family] = {}
    family_of: dict[str, str] = {}
    for text in expositions:
        for line in (raw.strip() for raw in text.split("\n")):
            if line.startswith("#"):
                _read_comment(line, families, family_of)
            elif line:
                try:
                    name, label_text, labels, value = _parse_sample(line)
                except ValueError:
                    continue
                family_name = family_of.get(name, name)
                family = families.setdefault(family_name, _Family())
                largest = family_name in max_families or (family.kind == "summary" and "quantile" in dict(labels))
                key = (name, labels)
                prior = family.samples.get(key)
                family.samples[key] = (
                    (name + label_text, value) if prior is None else (prior[0], _combine(prior[1], value, largest))
                )
    lines: list[str] = []
    for family in families.values():
        lines += [header for header in (family.help, family.type) if header is not None]
        lines += [f"{sample} {_format(value)}" for sample, value in family.samples.values()]
    return "".join(line + "\n" for line in lines)


def _read_comment(line: str, families: dict[str, _Family], family_of: dict[str, str]) -> None:
    """Record a HELP or TYPE line the first time its family has one; other comments say nothing."""
    parts = line.split(None, 3)
    if len(parts) < 3 or parts[0] != "#" or parts[1] not in ("HELP", "TYPE"):
        return
    keyword, name = parts[1], parts[2]
    kind = parts[3] if keyword == "TYPE" and len(parts) == 4 else ""
    if keyword == "TYPE" and kind not in _SAMPLES:
        return
    family = families.setdefault(name, _Family())
    if keyword == "HELP":
        family.help = family.help or line
    elif family.type is None:
        family.type, family.kind = line, kind
        for suffix in _SAMPLES[kind]:
            family_of.setdefault(name + suffix, name)


def _parse_sample(line: str) -> tuple[str, str, LabelSet, Number]:
    """The name, label text, label set and value of a sample line; ``ValueError`` if malformed."""
    pos = _skip(line, 0, _NAME_CHARS)
    name = line[:pos]
    labels: dict[str, str] = {}
    if line.startswith("{", pos):
        pos = _labels_end(line, pos + 1, labels)
    fields = line[pos:].split()
    if not name or len(fields) not in (1, 2) or len(fields) == 2 and not fields[1].lstrip("-").isdigit():
        raise ValueError(line)
    return name, line[len(name) : pos], frozenset(labels.items()), _number(fields[0])


def _labels_end(line: str, pos: int, labels: dict[str, str]) -> int:
    """Read ``name="value",...}`` from just after the brace into ``labels`` (values as written, escapes
    and all); return the position after the closing brace. A backslash escapes whatever follows it,
    so only an unescaped quote ends a value."""
    while True:
        pos = _skip(line, pos, " \t")
        if line.startswith("}", pos):
            return pos + 1
        start, pos = pos, _skip(line, pos, _NAME_CHARS)
        label = line[start:pos]
        pos = _skip(line, pos, " \t")
        if not label or not line.startswith("=", pos):
            raise ValueError(line)
        pos = _skip(line, pos + 1, " \t")
        if not line.startswith('"', pos):
            raise ValueError(line)
        start = pos = pos + 1
        while pos < len(line) and line[pos] != '"':
            pos += 2 if line[pos] == "\\" else 1
        if pos >= len(line):
            raise ValueError(line)
        labels[label] = line[start:pos]
        pos = _skip(line, pos + 1, " \t")
        if line.startswith(",", pos):
            pos += 1
        elif not line.startswith("}", pos):
            raise ValueError(line)


def _skip(line: str, pos: int, chars: Collection[str]) -> int:
    """The position of the first character at or after ``pos`` that is not one of ``chars``."""
    while pos < len(line) and line[pos] in chars:
        pos += 1
    return pos


def _number(token: str) -> Number:
    """An integer literal stays an ``int``, exact at any size, so a summed counter is written as one."""
    return int(token) if token.lstrip("+-").isdigit() else float(token)


def _combine(a: Number, b: Number, largest: bool) -> Number:
    """The sum, or the larger (a NaN losing to any number); a float if either was one."""
    if not largest:
        return a + b
    larger = b if math.isnan(a) or b > a else a
    return larger if type(a) is type(b) else float(larger)


def _format(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
