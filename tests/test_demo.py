"""`lrpilot demo` (the README's command 1): a real daemon process and a real
training under its control."""

from __future__ import annotations

import re
import subprocess

import pytest


def test_demo_trains_under_the_daemon_and_shows_its_decisions(lrpilot_exe):
    done = subprocess.run(
        [lrpilot_exe, "demo", "--steps", "700", "--sync"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    changes = re.findall(r">> step\s+(\d+)\s+LR ([\d.]+) -> ([\d.]+)\s+by policy: plateau:", out)
    assert changes, out
    assert all(float(new) < float(old) for _, old, new in changes)
    # In sync mode a decision lands right after the report that caused it:
    # reports come every 25 steps, so the step it lands on is 25k + 1.
    assert all(int(step) % 25 == 1 for step, _, _ in changes), changes
    # The corrupted batch at 60 % of the steps (420) trips the guard, on the
    # loss of that step: the cut lands at the next one, and the loop reloads.
    assert "!! step   420  a corrupted batch" in out, out
    trips = re.findall(r">> step\s+(\d+)\s+LR ([\d.]+) -> ([\d.]+)\s+by policy: guard:spike:", out)
    assert [step for step, _, _ in trips] == ["421"], out
    assert float(trips[0][2]) == pytest.approx(float(trips[0][1]) * 0.1)
    assert re.search(r"!! step   420  the guard tripped \(guard:spike, loss [\d.]+\)", out), out
    summary = out[out.index("summary") :]
    assert f"LR changes decided by the daemon: {len(changes) + 1}" in summary
    assert "models reloaded after a guard trip: 1" in summary
    assert re.search(r"with lrpilot\s+[\d.]+\s+[\d.]+%", summary)
    assert re.search(r"constant LR\s+[\d.]+\s+[\d.]+%", summary)
    assert "telemetry records dropped: 0" in summary


def test_demo_refuses_a_bad_policy_in_one_line(lrpilot_exe):
    done = subprocess.run(
        [lrpilot_exe, "demo", "--policy", '{"kind": "plateau", "factor": 3}'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "lrpilot demo: --policy: plateau.factor: Input should be less than 1 (got 3)"
    ]
