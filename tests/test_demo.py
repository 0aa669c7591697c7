"""`lrpilot demo` (the README's command 1) runs and shows the policies acting."""

from __future__ import annotations

import itertools
import json
import re
import subprocess

from conftest import ROOT


def test_demo_shows_plateau_cuts_that_simulate_agrees_with(lrpilot_exe):
    done = subprocess.run([lrpilot_exe, "demo"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cuts = re.findall(r"step\s+(\d+)\s+plateau\(val_loss\)\s+([\d.]+) -> ([\d.]+)", done.stdout)
    assert cuts, done.stdout
    # The same stream through `lrpilot simulate` must cut at the same steps.
    spec = {"kind": "plateau", "metric": "val_loss", "patience": 2, "factor": 0.5}
    stream = ROOT / "client" / "data" / "example_metrics.jsonl"
    sim = subprocess.run(
        [
            lrpilot_exe,
            "simulate",
            "--policy",
            json.dumps(spec),
            "--base-lr",
            "0.05",
            "--input",
            str(stream),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [json.loads(line) for line in sim.stdout.splitlines()]
    sim_cuts = [
        now["step"] for before, now in itertools.pairwise(lines) if now["lrs"][0] < before["lrs"][0]
    ]
    assert [int(step) for step, _, _ in cuts] == sim_cuts


def test_demo_steps_limits_the_replay(lrpilot_exe):
    done = subprocess.run([lrpilot_exe, "demo", "--steps", "100"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [int(row.split()[0]) for row in rows] == [50, 100]
