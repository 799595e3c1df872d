"""The exposition writer against its reference: for any label values and sample values, amiforge's text is byte for
byte what prometheus_client's `generate_latest` writes for the same families — counters, gauges and histograms."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from amiforge.lifecycle.exposition import Family, go_float, render

# Any text a label value may hold: quotes, backslashes, newlines, non-ASCII, empty.
label_values = st.text(alphabet=st.sampled_from(['a', 'Z', '0', '"', "\\", "\n", " ", "é", "{", ",", "=", "@"]),
                       max_size=8)  # fmt: skip
values = st.one_of(
    st.integers(min_value=0, max_value=10**12).map(float),
    st.floats(allow_nan=True, allow_infinity=True),
)


def _reference(metrics: Sequence[Metric]) -> bytes:
    class Fixed:
        def collect(self) -> Iterator[Metric]:
            yield from metrics

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    return generate_latest(registry)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(label_values, label_values, values), max_size=6), doc=label_values)
def test_counters_and_gauges_match_prometheus_client(rows: list[tuple[str, str, float]], doc: str) -> None:
    ours = [Family("x_boots", "counter", doc, ["zone", "app"]), Family("x_up", "gauge", doc, ["zone", "app"])]
    theirs: list[Metric] = [
        CounterMetricFamily("x_boots", doc, labels=["zone", "app"]),
        GaugeMetricFamily("x_up", doc, labels=["zone", "app"]),
    ]
    for zone, app, value in rows:
        for family in ours:
            family.add([zone, app], value)
        for metric in theirs:
            metric.add_metric([zone, app], value)  # type: ignore[attr-defined]
    assert render(ours) == _reference(theirs)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(label_values, label_values, st.lists(st.integers(0, 10**9), min_size=1, max_size=5), values),
        max_size=4,
    )
)
def test_histograms_match_prometheus_client(rows: list[tuple[str, str, list[int], float]]) -> None:
    # `le` sorts between the label names, as it does for amiforge's (image, le, target, version).
    ours = Family("x_seconds", "histogram", "h", ["b_image", "z_version"])
    theirs = HistogramMetricFamily("x_seconds", "h", labels=["b_image", "z_version"])
    for image, version, increments, total in rows:
        counts, running = [], 0
        for n in increments:
            running += n
            counts.append(running)
        bounds = [go_float(5.0 * (i + 1)) for i in range(len(counts) - 1)]
        buckets = [*zip(bounds, counts[:-1], strict=True), ("+Inf", counts[-1])]
        ours.lines.append(ours.histogram(ours.labels([image, version]), buckets, total))
        theirs.add_metric([image, version], [(le, float(n)) for le, n in buckets], total)
    assert render([ours]) == _reference([theirs])


def test_a_family_without_labels_and_large_values() -> None:
    ours = Family("x_total_bytes", "gauge", "big", [])
    ours.add([], 123456789.0)
    theirs = GaugeMetricFamily("x_total_bytes", "big")
    theirs.add_metric([], 123456789.0)
    assert render([ours]) == _reference([theirs])
    assert b"1.23456789e+08" in render([ours])


@pytest.mark.parametrize(
    ("name", "labels"), [("1bad", ["a"]), ("ok", ["bad-label"]), ("ok", ["__reserved"]), ("ok", ["le"])]
)
def test_invalid_names_are_refused_when_the_family_is_declared(name: str, labels: list[str]) -> None:
    with pytest.raises(ValueError, match="not valid Prometheus names"):
        Family(name, "gauge", "doc", labels)


def test_a_row_with_the_wrong_number_of_values_is_refused() -> None:
    family = Family("x", "gauge", "doc", ["a", "b"])
    with pytest.raises(ValueError, match="1 label values for 2 labels"):
        family.add(["only-one"], 1.0)


def test_a_counter_named_with_its_total_is_refused() -> None:
    with pytest.raises(ValueError, match="not valid Prometheus names"):
        Family("x_total", "counter", "doc", [])  # the text would say x_total_total
    assert Family("x_total", "gauge", "doc", []).name == "x_total"
