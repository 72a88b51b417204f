"""``merge`` on what front ends really export: real ``Metrics`` rendered by aioprometheus, merged into
one exposition that a Prometheus parser reads as the whole server."""

from __future__ import annotations

import pytest
from aioprometheus.renderer import render

from mlserve.metrics import LATENCY_BUCKETS, Metrics
from mlserve.metricsmerge import MAX_FAMILIES, merge

REQUESTS = 'mlserve_requests_total{endpoint="predict",model="iris",status="%d",version="1"}'
LATENCY = 'mlserve_request_duration_seconds_%s{endpoint="predict",%smodel="iris",version="1"}'
IRIS = 'model="iris",version="1"'


def exposition(metrics: Metrics) -> str:
    """What ``/metrics`` of one front end answers."""
    metrics._export()
    return render(metrics.registry, [])[0].decode()


def samples(text: str) -> dict[str, float]:
    """Each sample's name and labels, as written, to its value."""
    lines = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {series: float(value) for series, value in lines}


def front_ends() -> list[str]:
    """Three front ends of one server: their own requests, batches, queues and workers; the same
    models, accuracy and breaker."""
    first, second, third = Metrics(), Metrics(), Metrics()
    for seconds in (0.003, 0.003, 0.2):
        first.recorder("iris", "1", "predict", 200).record(seconds)
    for seconds in (0.0007, 0.003):
        second.recorder("iris", "1", "predict", 200).record(seconds)
    second.recorder("iris", "1", "predict", 500).record(0.004)
    first.batch_size.get({"model": "iris", "version": "1"}).observe(4)
    second.batch_size.get({"model": "iris", "version": "1"}).observe(1)
    for metrics, depth, busy in ((first, 3, 0.3), (second, 2, 0.8), (third, 0, 0.1)):
        metrics.queue_depth.set({"model": "iris"}, depth)
        metrics.workers_live.set({"model": "iris"}, 2)
        metrics.loop_busy.set({}, busy)
        metrics.model_info.set({"model": "iris", "version": "1", "state": "ready", "active": "true"}, 1)
        metrics.model_accuracy.set({"model": "iris", "version": "1"}, 0.97)
        metrics.cache_breaker_open.set({}, 0)
        metrics.activations.inc({"model": "iris"})
    first.cache_breaker_open.set({}, 1)
    return [exposition(metrics) for metrics in (first, second, third)]


def test_front_ends_merge_into_the_server() -> None:
    texts = front_ends()
    merged = merge(texts)
    values = samples(merged)

    assert values[REQUESTS % 200] == 5 and f"{REQUESTS % 200} 5\n" in merged, "a counter stays an integer"
    assert values[REQUESTS % 500] == 1, "a series one front end has is kept"
    assert values['mlserve_queue_depth{model="iris"}'] == 5
    assert values['mlserve_workers_live{model="iris"}'] == 6
    assert values['mlserve_batch_size_count{model="iris",version="1"}'] == 2
    assert values['mlserve_batch_size_sum{model="iris",version="1"}'] == 5

    # Every family and series once, in the order the front ends render them.
    types = [line for line in texts[0].splitlines() if line.startswith("# TYPE")]
    assert [line for line in merged.splitlines() if line.startswith("# TYPE")] == types
    assert len(values) == len(merged.splitlines()) - 2 * len(types)

    # State every front end reports alike is the server's state, not N times it.
    assert values['mlserve_model_info{active="true",model="iris",state="ready",version="1"}'] == 1
    assert values[f"mlserve_model_accuracy{{{IRIS}}}"] == 0.97
    assert values['mlserve_activations_total{model="iris"}'] == 1
    assert values["mlserve_cache_breaker_open"] == 1, "one open breaker shows"
    assert values["mlserve_event_loop_busy_ratio"] == 0.8, "the busiest loop"

    # Everything else is the sum of the front ends.
    inputs = [samples(text) for text in texts]
    for series, value in values.items():
        if series.split("{")[0] not in MAX_FAMILIES:
            assert value == pytest.approx(sum(front_end.get(series, 0) for front_end in inputs)), series


def test_merged_histogram_is_still_a_histogram() -> None:
    values = samples(merge(front_ends()))
    buckets = [values[LATENCY % ("bucket", f'le="{bound}",')] for bound in (*map(float, LATENCY_BUCKETS), "+Inf")]
    assert buckets == sorted(buckets), "cumulative"
    assert buckets[LATENCY_BUCKETS.index(0.001)] == 1 and buckets[LATENCY_BUCKETS.index(0.005)] == 5
    assert buckets[-1] == values[LATENCY % ("count", "")] == 6, "the 500 is timed in the same series"
    assert values[LATENCY % ("sum", "")] == pytest.approx(0.003 * 3 + 0.2 + 0.0007 + 0.004)


def test_label_order_escapes_timestamps_and_kinds() -> None:
    first = r"""# HELP x_total Things, per path.
# TYPE x_total counter
x_total{path="C:\\dir\"q\",}\n",a="1"} 2
x_total{b="2",a="1"} 1 1700000000000
# HELP rpc_seconds RPC latency.
# TYPE rpc_seconds summary
rpc_seconds{quantile="0.5"} 0.2
rpc_seconds{quantile="0.99"} 1.5
rpc_seconds_sum 10
rpc_seconds_count 40
queue_bucket 2
# TYPE edge gauge
edge -Inf
"""
    second = r"""# HELP rpc_seconds RPC latency, per front end.
# TYPE rpc_seconds summary
rpc_seconds{quantile="0.5"} 0.3
rpc_seconds{quantile="0.99"} NaN
rpc_seconds_sum 2.5e0
rpc_seconds_count 10
# HELP only_here_total Seen by one front end.
# TYPE only_here_total counter
only_here_total 7
queue_bucket 1
# TYPE edge gauge
edge -Inf
# HELP x_total Things, per path.
# TYPE x_total counter
x_total{ a = "1" , b="2", } 4
x_total{a="1",path="C:\\dir\"q\",}\n"} 3
"""
    # Label sets match whatever their order; the first text is kept. A summary's quantiles are the
    # largest (a NaN, no observations, loses); its sum and count add. ``queue_bucket`` has no TYPE
    # line, so it is a family of its own, not a histogram's bucket.
    assert merge([first, second]) == r"""# HELP x_total Things, per path.
# TYPE x_total counter
x_total{path="C:\\dir\"q\",}\n",a="1"} 5
x_total{b="2",a="1"} 5
# HELP rpc_seconds RPC latency.
# TYPE rpc_seconds summary
rpc_seconds{quantile="0.5"} 0.3
rpc_seconds{quantile="0.99"} 1.5
rpc_seconds_sum 12.5
rpc_seconds_count 50
queue_bucket 3
# TYPE edge gauge
edge -Inf
# HELP only_here_total Seen by one front end.
# TYPE only_here_total counter
only_here_total 7
"""


def test_a_histogram_is_one_family_by_its_type_line() -> None:
    first = '# TYPE lat histogram\nlat_bucket{le="1"} 1\nlat_bucket{le="+Inf"} 2\nlat_sum 3\nlat_count 2\n'
    second = first + 'lat_bucket{le="+Inf",route="b"} 1\nlat_sum{route="b"} 0.5\nlat_count{route="b"} 1\n'
    # A series one front end adds stays whole, after the family's others, not split among them.
    assert merge([first, second]) == (
        '# TYPE lat histogram\nlat_bucket{le="1"} 2\nlat_bucket{le="+Inf"} 4\nlat_sum 6\nlat_count 4\n'
        'lat_bucket{le="+Inf",route="b"} 1\nlat_sum{route="b"} 0.5\nlat_count{route="b"} 1\n'
    )
    # Named among the largest, every sample of the family is, its buckets and count included.
    assert merge([first, second], max_families={"lat"}).startswith(
        '# TYPE lat histogram\nlat_bucket{le="1"} 1\nlat_bucket{le="+Inf"} 2\nlat_sum 3\nlat_count 2\n'
    )


def test_a_bad_line_costs_only_itself() -> None:
    texts = front_ends()
    garbage = [
        'mlserve_requests_total{model="iris" 3',
        'mlserve_requests_total{model="iris} 3',
        "mlserve_queue_depth{} three",
        "mlserve_queue_depth 1 2 3",
        "{model=\"iris\"} 1",
        "# TYPE mlserve_queue_depth sideways",
        "just words",
    ]
    spoiled = "\n".join(garbage) + "\n" + texts[0]
    assert merge([spoiled, *texts[1:]]) == merge(texts)

    # aioprometheus writes label values unescaped: a quote in one breaks that sample's line alone.
    quoted = Metrics()
    quoted.queue_depth.set({"model": 'say "hi"'}, 1)
    quoted.queue_depth.set({"model": "iris"}, 4)
    values = samples(merge([*texts, exposition(quoted)]))
    assert values['mlserve_queue_depth{model="iris"}'] == 9
    assert not any("say" in series for series in values)


def test_a_prometheus_parser_reads_the_merge() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    escaped = '# TYPE x_total counter\nx_total{path="C:\\\\dir\\"q\\",}\\n"} 2\n'
    merged = merge([*front_ends(), escaped])
    families = {family.name: family for family in parser.text_string_to_metric_families(merged)}
    requests = families["mlserve_requests"].samples
    assert sum(sample.value for sample in requests if sample.labels["status"] == "200") == 5
    assert families["mlserve_request_duration_seconds"].type == "histogram"
    assert [sample.labels for sample in families["x"].samples] == [{"path": 'C:\\dir"q",}\n'}]
