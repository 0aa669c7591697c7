"""The control plane (daemon/service/control.py) on its own, over a data plane
with a store in a tmp dir and no socket: each request's answer, read back
through the control protocol's models as a client reads it, and each
refusal as the one line an operator sees. Commands go to every connected
rank and are journaled."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrpilot.daemon.control_protocol import (
    ANSWERS,
    MAX_CONTROL_BYTES,
    CommandAnswer,
    HistoryAnswer,
    Refusal,
    RunsAnswer,
    ShowAnswer,
    StoreAnswer,
    encode_answer,
)
from lrpilot.daemon.service.config import DaemonConfig
from lrpilot.daemon.service.control import ControlPlane
from lrpilot.daemon.service.dataplane import DataPlane
from lrpilot.protocol import STEP, BatchEncoder, GroupInfo, Hello, LRCommand, decode, encode

PLATEAU = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane over a plane with run "r": two ranks, groups body and
    head, ten steps in, the NaN loss of a diverged step among its metrics."""
    plane = DataPlane(DaemonConfig(state_dir=tmp_path / "state"))
    groups = [GroupInfo(name="body", lr=0.1), GroupInfo(name="head", lr=0.01)]
    for rank in (0, 1):
        hello = Hello(run="r", rank=rank, world_size=2, groups=groups, policy=PLATEAU, pid=rank)
        plane.handle(b"rank%d" % rank, [encode(hello)], 0.0)
        records = [(k, k, STEP, {"loss": math.nan if k == 10 else 1.0}) for k in range(1, 11)]
        plane.handle(b"rank%d" % rank, BatchEncoder("r", rank).encode(records, {}), 0.5)
    yield ControlPlane(plane)
    plane.close()


def ask(control: ControlPlane, **request) -> tuple:
    """(the answer as a client reads it, the commands it sent)."""
    answer, outgoing = control.answer(json.dumps(request).encode())
    wire = json.loads(encode_answer(answer))
    kind = ANSWERS[request["op"]] if wire["ok"] else Refusal
    return kind.model_validate(wire), outgoing


def refused(control: ControlPlane, **request) -> str:
    answer, outgoing = ask(control, **request)
    assert isinstance(answer, Refusal) and outgoing == [], answer
    assert "\n" not in answer.error
    return answer.error


def test_runs_and_show_describe_the_run_as_the_registry_has_it(control):
    runs, _ = ask(control, op="runs")
    assert isinstance(runs, RunsAnswer)
    [run] = runs.runs
    assert (run.run, run.status, run.step, run.ranks, run.world_size) == (
        "r",
        "active",
        10,
        [0, 1],
        2,
    )
    assert (run.groups, run.lrs, run.policy_kind, run.held) == (
        ["body", "head"],
        [0.1, 0.01],
        "plateau",
        False,
    )
    shown, _ = ask(control, op="show", run="r")
    assert isinstance(shown, ShowAnswer)
    detail = shown.run
    assert [s.rank for s in detail.sessions] == [0, 1] and detail.version == 0
    assert math.isnan(detail.last_metrics["loss"])  # a diverged loss is data, and reads back
    assert detail.policy["kind"] == "plateau" and detail.history == []


def test_set_lr_holds_one_group_sends_to_every_rank_and_is_journaled(control):
    answer, outgoing = ask(control, op="set_lr", run="r", lr=0.3, group="head", actor="ann")
    assert isinstance(answer, CommandAnswer)
    command = answer.command
    assert (command.lrs, command.hold, command.actor, command.version) == (
        [0.1, 0.3],
        True,
        "ann",
        1,
    )
    assert sorted(to for to, _ in outgoing) == [b"rank0", b"rank1"]
    assert all(decode(frames) == command for _, frames in outgoing)
    history, _ = ask(control, op="history", run="r")
    assert isinstance(history, HistoryAnswer)
    [entry] = history.history
    assert (entry.version, entry.old_lrs, entry.new_lrs, entry.actor) == (
        1,
        [0.1, 0.01],
        [0.1, 0.3],
        "ann",
    )
    # Held: a pause is refused, a resume gives the LRs back to the policy.
    assert "already held" in refused(control, op="pause", run="r")
    resumed, _ = ask(control, op="resume", run="r")
    assert resumed.command.hold is False and resumed.command.lrs == [0.1, 0.01]
    assert "not held" in refused(control, op="resume", run="r")


def test_a_policy_switch_and_giving_back_the_scripts_policy(control):
    cosine = {"kind": "cosine", "T_max": 100}
    switched, _ = ask(control, op="policy", run="r", policy=cosine)
    assert isinstance(switched.command, LRCommand)
    assert switched.command.policy["kind"] == "cosine" and switched.command.policy_set
    back, _ = ask(control, op="policy", run="r", policy=None)
    assert back.command.policy["kind"] == "plateau"
    assert "given back" in back.command.reason


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"op": "set_lr", "run": "r", "lr": 0.0}, "lr: an LR must be a positive number"),
        ({"op": "set_lr", "run": "r", "lr": 0.1, "group": "tail"}, "has no param group 'tail'"),
        ({"op": "set_lr", "run": "nope", "lr": 0.1}, "unknown run 'nope' (runs: r)"),
        ({"op": "policy", "run": "r", "policy": {"kind": "warp"}}, "kind"),
        ({"op": "policy", "run": "r", "policy": {"kind": "cosine", "T_max": 1e300}}, "±2**53"),
        ({"op": "history", "run": "r", "limit": 0}, "bad request: limit"),
        ({"op": "launch"}, "unknown op 'launch'"),
        ({"op": "runs", "please": 1}, "please: unknown field"),
        ({"op": "runs", "actor": "a\x1bb"}, "actor: must not hold control characters"),
    ],
)
def test_a_bad_request_is_refused_in_one_line_and_changes_nothing(control, request_, expected):
    before = control.plane.registry.runs["r"].engine.version
    assert expected in refused(control, **request_)
    assert control.plane.registry.runs["r"].engine.version == before


def test_what_is_not_a_request_is_refused_in_one_line(control):
    for raw, expected in [
        (b"{", "not JSON"),
        (b"[]", "a request is a JSON object with an op"),
        (b"x" * (MAX_CONTROL_BYTES + 1), f"over the {MAX_CONTROL_BYTES} allowed"),
    ]:
        answer, outgoing = control.answer(raw)
        assert isinstance(answer, Refusal) and expected in answer.error and outgoing == []


def test_a_change_to_a_run_with_no_connected_rank_is_refused(control):
    plane = control.plane
    for identity in (b"rank0", b"rank1"):
        plane.registry.end_session(identity, 1.0)
    assert "no connected rank" in refused(control, op="pause", run="r")
    runs, _ = ask(control, op="runs")
    assert runs.runs[0].status == "ended"


def test_store_commits_what_the_plane_has_before_it_answers(control):
    answer, _ = ask(control, op="store")
    assert isinstance(answer, StoreAnswer)
    assert answer.path == str(control.plane.store.path)
    assert len(list(control.plane.store.records("r"))) == 10
