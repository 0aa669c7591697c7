"""The shard merge (daemon/observability/shard_exposition.py): the shards'
expositions as one, each sample labelled with its shard.

The inputs are real: prometheus-client's ``generate_latest`` of registries
with every metric type, label values that hold what a splice could trip on
(quotes, backslashes, newlines, ``}``, ``#``), and text written the way the
exporter writes its per-run families. The output is read back with
prometheus-client's parser (every input sample once, with its shard, its
exact value; every family once, with its type) and checked by the real
``promtool check metrics``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter as Tally
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)
from prometheus_client.core import GaugeHistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from lrpilot.daemon.observability.exporter import label
from lrpilot.daemon.observability.shard_exposition import merge

# Label values a splice that reads into the label set would get wrong.
AWKWARD = ['say "hi"', "back\\slash", "two\nlines", "brace } inside", "# not a comment", "{,=}"]

Key = tuple[str, str, str, tuple[tuple[str, str], ...], str, object]


class GaugeHistogram(Collector):
    def __init__(self, shard: int) -> None:
        self.shard = shard

    def collect(self) -> Iterator[Metric]:
        yield GaugeHistogramMetricFamily(
            "queue_depth",
            "records waiting, by depth",
            buckets=[("1", 2.0 + self.shard), ("+Inf", 5.0 + self.shard)],
            gsum_value=7.5,
        )


def registry_text(shard: int) -> str:
    """A registry with each metric type, labelled and not, its values set
    apart by ``shard`` so that a sample given the wrong shard shows."""
    registry = CollectorRegistry()
    up = Gauge("lrpilot_daemon_up", "1 while the daemon runs", registry=registry)
    up.set(1)
    Gauge("temperature", "a gauge that goes below zero", registry=registry).set(-2.5 - shard)
    requests = Counter("requests", "requests, by path", ["path"], registry=registry)
    for i, value in enumerate(AWKWARD):
        requests.labels(value).inc(i + shard + 0.25)
    Counter("restarts", "an unlabelled counter", registry=registry).inc(shard)
    latency = Histogram(
        "latency_seconds", "a histogram", ["route"], buckets=(0.1, 1.0), registry=registry
    )
    for value in (0.05, 0.5, 5.0 + shard):
        latency.labels(AWKWARD[shard % len(AWKWARD)]).observe(value)
    Histogram("plain_seconds", "an unlabelled histogram", registry=registry).observe(shard)
    sizes = Summary("batch_bytes", "a summary", ["kind"], registry=registry)
    sizes.labels("step").observe(100 + shard)
    Summary("plain_bytes", "an unlabelled summary", registry=registry).observe(3)
    Info("build", "the version", registry=registry).info(
        {"version": f'0.{shard} "q" \\ }} # x', "commit": "abc\ndef"}
    )
    Enum("phase", "an enum", states=["warmup", "train"], registry=registry).state("train")
    Gauge("never_set", "a labelled gauge with no children", ["x"], registry=registry)
    registry.register(GaugeHistogram(shard))
    return generate_latest(registry).decode()


def run_text(runs: list[str], shard: int) -> str:
    """Per-run families as the exporter writes them (exporter.render_runs):
    HELP and TYPE, then the samples, a counter under its _total name."""
    lines = [
        "# HELP lrpilot_run_lr the LR in effect for the param group",
        "# TYPE lrpilot_run_lr gauge",
    ]
    for i, run in enumerate(runs):
        for group in range(2):
            lines.append(f'lrpilot_run_lr{{run={label(run)},group="{group}"}} {0.1 * (i + 1)!r}')
    lines += [
        "# HELP lrpilot_run_lr_changes_total LR changes journaled, by reason",
        "# TYPE lrpilot_run_lr_changes_total counter",
    ]
    for run in runs:
        lines.append(f'lrpilot_run_lr_changes_total{{run={label(run)},reason="plateau"}} {shard}')
    lines += [
        "# HELP lrpilot_run_policy_info the run's policy",
        "# TYPE lrpilot_run_policy_info gauge",
    ]
    for run in runs:
        spec = label('{"kind":"plateau","note":"a } and a # and a \\\\"}')
        lines.append(f'lrpilot_run_policy_info{{run={label(run)},kind="plateau",spec={spec}}} 1')
    return "\n".join(lines) + "\n"


ONLY_IN_ONE = (
    "# HELP lrpilot_shard_only a family only one shard has\n"
    "# TYPE lrpilot_shard_only gauge\n"
    'lrpilot_shard_only{why="only here"} 42\n'
)


def samples(text: str) -> list[Key]:
    """Every sample: (family, type, name, labels, value, timestamp); the
    value as its repr, so that NaN equals NaN."""
    return [
        (f.name, f.type, s.name, tuple(sorted(s.labels.items())), repr(s.value), s.timestamp)
        for f in text_string_to_metric_families(text)
        for s in f.samples
    ]


def labelled(text: str, shard: str) -> list[Key]:
    """The samples of ``text`` as the merge should label them."""
    return [
        (family, kind, name, tuple(sorted((*labels, ("shard", shard)))), value, ts)
        for family, kind, name, labels, value, ts in samples(text)
    ]


def families(text: str) -> list[tuple[str, str]]:
    return [(f.name, f.type) for f in text_string_to_metric_families(text)]


def assert_merged(parts: list[tuple[str, str]], merged: str) -> None:
    """Every input sample exactly once, with its shard, and nothing else;
    every family exactly once, with the type its parts give it; the shard
    label first on every sample line."""
    expected = Tally(key for shard, text in parts for key in labelled(text, shard))
    got = Tally(samples(merged))
    assert got == expected
    assert max(got.values(), default=1) == 1, "a series appears twice"
    seen = families(merged)
    assert len(seen) == len({name for name, _ in seen}), f"a family split in two: {seen}"
    kinds = {name: kind for _, text in parts for name, kind in families(text)}
    assert dict(seen) == kinds
    for line in merged.split("\n"):  # not splitlines(): a label value may hold a "\r"
        if line and not line.startswith("#"):
            assert line.split("{", 1)[1].startswith('shard="'), line


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: `apt-get install -y prometheus` (Debian's package), "
            "or run `bash scripts/test`"
        )
    return subprocess.run(
        [found, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


def test_registries_and_run_families_merge_into_one_exposition():
    parts = [
        ("0", registry_text(0) + run_text(["a", 'b "quoted" }#'], 0)),
        ("1", registry_text(1) + run_text(["c\\d", "e\nf"], 1) + ONLY_IN_ONE),
        ("2", registry_text(2) + run_text(["g"], 2)),
    ]
    merged = merge(parts)
    assert_merged(parts, merged)
    assert merged.endswith("\n") and "\n\n" not in merged
    assert merged.count("# HELP lrpilot_shard_only ") == 1
    assert 'lrpilot_shard_only{shard="1",why="only here"} 42\n' in merged
    # The shards' common series stay apart.
    for shard in ("0", "1", "2"):
        assert f'lrpilot_daemon_up{{shard="{shard}"}} 1.0\n' in merged


def test_families_come_in_first_seen_order_with_the_samples_in_part_order():
    first = (
        "# HELP up whether up\n"
        "# TYPE up gauge\n"
        "up 1\n"
        "# a comment, dropped\n"
        "\n"
        "# HELP lat latency\n"
        "# TYPE lat histogram\n"
        'lat_bucket{le="1"} 1\n'
        'lat_bucket{le="+Inf"} 2\n'
        "lat_count 2\n"
        "lat_sum 3.5\n"
        'stray{x="} 1"} 7 1700000000000\n'
        "# TYPE g gauge\n"
        'g{a="1"} 1\n'
        "g{} 2\n"
    )
    second = (
        "# TYPE lat histogram\n"
        'lat_bucket{le="1"} 0\n'
        'lat_bucket{le="+Inf"} 0\n'
        "lat_count 0\n"
        "lat_sum 0\n"
        "# HELP only_here in the second part only\n"
        "# TYPE only_here counter\n"
        "only_here_total 4\n"
        "empty{} 5\n"
        '  indented{a="b"}  6\n'
        "tabbed\t7\n"
        "up 0 1700000000000"
    )
    assert merge([("0", first), ("1", second)]) == (
        "# HELP up whether up\n"
        "# TYPE up gauge\n"
        'up{shard="0"} 1\n'
        'up{shard="1"} 0 1700000000000\n'
        "# HELP lat latency\n"
        "# TYPE lat histogram\n"
        'lat_bucket{shard="0",le="1"} 1\n'
        'lat_bucket{shard="0",le="+Inf"} 2\n'
        'lat_count{shard="0"} 2\n'
        'lat_sum{shard="0"} 3.5\n'
        'lat_bucket{shard="1",le="1"} 0\n'
        'lat_bucket{shard="1",le="+Inf"} 0\n'
        'lat_count{shard="1"} 0\n'
        'lat_sum{shard="1"} 0\n'
        'stray{shard="0",x="} 1"} 7 1700000000000\n'
        "# TYPE g gauge\n"
        'g{shard="0",a="1"} 1\n'
        'g{shard="0"} 2\n'
        "# HELP only_here in the second part only\n"
        "# TYPE only_here counter\n"
        'only_here_total{shard="1"} 4\n'
        'empty{shard="1"} 5\n'
        'indented{shard="1",a="b"}  6\n'
        'tabbed{shard="1"} 7\n'
    )


def test_the_label_and_its_value_are_escaped():
    merged = merge([('a "b" \\ c\nd', "x 1\n")], label="origin")
    assert merged == 'x{origin="a \\"b\\" \\\\ c\\nd"} 1\n'
    assert samples(merged) == [("x", "unknown", "x", (("origin", 'a "b" \\ c\nd'),), "1", None)]


def test_promtool_accepts_the_merge():
    parts = [
        ("0", registry_text(0) + run_text(["a", 'b "quoted" }#'], 0)),
        ("1", registry_text(1) + run_text(["c\\d", "e\nf"], 1) + ONLY_IN_ONE),
    ]
    done = promtool(merge(parts))
    # promtool 2.42 writes its lint findings to stderr and exits 3 for them,
    # 1 for a text it cannot parse (a second HELP or TYPE line for a family).
    # It does not look for a series given twice (two `a{x="1"} 1` lines pass):
    # assert_merged does.
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    # It does fail the shards' texts served as they are, one after another.
    joined = promtool(parts[0][1] + parts[1][1])
    assert joined.returncode == 1
    assert "second HELP line for metric name" in joined.stderr


@pytest.mark.parametrize("empty", ["", "\n\n", "# only a comment\n", None])
def test_an_empty_part_is_skipped(empty):
    if empty is None:
        empty = generate_latest(CollectorRegistry()).decode()  # a registry with nothing in it
    text = registry_text(0)
    assert merge([]) == ""
    assert merge([("0", empty)]) == ""
    assert merge([("0", empty), ("1", text), ("2", "")]) == merge([("1", text)])


def test_a_line_that_is_not_a_sample_is_refused():
    with pytest.raises(ValueError, match=r"part '1': not a sample line: '9lives 1'"):
        merge([("0", "ok 1\n"), ("1", "# TYPE ok gauge\n9lives 1\n")])


LABEL_VALUES = st.text(
    st.one_of(st.sampled_from('"\\\n}{#, ='), st.characters(blacklist_categories=("Cs",))),
    max_size=12,
)


@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    shards=st.lists(LABEL_VALUES, min_size=1, max_size=3, unique=True),
    series=st.lists(
        st.tuples(LABEL_VALUES, LABEL_VALUES, st.floats()),
        max_size=6,
    ),
    counts=st.lists(st.floats(min_value=0, allow_infinity=False), max_size=3),
)
def test_any_label_values_and_values_round_trip(shards, series, counts):
    parts = []
    for k, shard in enumerate(shards):
        registry = CollectorRegistry()
        gauge = Gauge("fuzz_gauge", "labelled", ["a", "b"], registry=registry)
        for a, b, value in series[k:]:
            gauge.labels(a, b).set(value)
        counter = Counter("fuzz", "labelled", ["c"], registry=registry)
        for i, value in enumerate(counts):
            counter.labels(series[i][0] if i < len(series) else str(i)).inc(value)
        Gauge("fuzz_plain", "unlabelled", registry=registry).set(k)
        parts.append((shard, generate_latest(registry).decode()))
    assert_merged(parts, merge(parts))
