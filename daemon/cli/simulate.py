"""``lrpilot simulate``: replay a metric stream through a policy; the contract is
"The replay contract" in docs/policies.md.

Input, one JSON object a line: ``{"step": INT, "metrics": {"NAME": FLOAT}}``;
output, one line per input line: ``{"step": INT, "lrs": [...]}`` (plus
``"momenta"`` for policies that cycle momentum). Blank lines are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from lrpilot.errors import LRPilotError
from lrpilot.policies import Policy, ScheduleExhausted


class ReplayError(LRPilotError, ValueError):
    """A record could not be replayed; the message names its line and field."""


@dataclass(frozen=True, slots=True)
class MetricRecord:
    step: int
    metrics: Mapping[str, float]


RECORD_KEYS = {"step", "metrics"}


def parse_record(line: str) -> MetricRecord:
    """Parse one input line; raises ValueError naming the wrong field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - RECORD_KEYS)
    if unknown:  # a typo ("metric") would replay as a record without metrics
        raise ValueError(f"{unknown[0]}: unknown field (a record has step and metrics)")
    step = obj.get("step")
    if step is None:
        raise ValueError("step: required field is missing")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"step: expected an integer, got {step!r}")
    metrics = obj.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics: expected an object of name: number, got {metrics!r}")
    for name, value in metrics.items():
        # NaN and Infinity (JSON's de-facto tokens) are data: a diverged
        # loss, which the policy takes as the daemon does (torch's rules).
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"metrics.{name}: expected a number, got {value!r}")
    return MetricRecord(step, metrics)


def replay_record(policy: Policy, record: MetricRecord) -> dict[str, Any]:
    """Step ``policy`` with one record; return what it left (an output line)."""
    out: dict[str, Any] = {"step": record.step, "lrs": policy.step(record.metrics)}
    if policy.momenta is not None:
        out["momenta"] = list(policy.momenta)
    return out


def replay(policy: Policy, records: Iterable[MetricRecord]) -> Iterator[dict[str, Any]]:
    for record in records:
        yield replay_record(policy, record)


def numbered_records(lines: Iterable[str]) -> Iterator[tuple[int, MetricRecord]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, parse_record(line)
        except ValueError as exc:
            raise ReplayError(f"line {number}: {exc}") from None


def run(policy: Policy, lines: Iterable[str], out: TextIO, flush_each: bool = False) -> None:
    """Replay ``lines`` to ``out``; stops at the first bad line with ReplayError.

    Lines before the bad one have been written; nothing is written for it.
    """
    for number, record in numbered_records(lines):
        try:
            result = replay_record(policy, record)
        except ScheduleExhausted as exc:
            raise ReplayError(f"line {number}: {exc}") from None
        out.write(json.dumps(result) + "\n")
        if flush_each:
            out.flush()
