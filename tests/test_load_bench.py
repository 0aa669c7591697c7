"""bench/load.py, the cluster-scale load test, run small: a real daemon and
real load processes, every record accounted for, decisions and operator
commands measured at the ranks. The figures themselves belong to
`bash scripts/bench --load` (docs/scaling.md); this checks the machinery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shards", [1, 2])
def test_a_small_load_run_accounts_for_every_record(tmp_path, shards):
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--ranks", "28", "--procs", "2",
         "--probes", "4", "--seconds", "4", "--operator-every", "0.1", "--no-memory",
         "--shards", str(shards), "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(out.read_text())
    assert result["lost"] == 0, result
    assert result["shards"] == shards
    # 24 ranks in runs of 1, 2, 4, 8, 9 (plateau, cosine, step in turn) and
    # 4 single-rank probes in a process of their own.
    assert result["records_sent"] >= 28 * 100 * 3, result["records_sent"]
    assert 0 < result["records_stored"] < result["records_sent"]  # the drivers' streams
    assert result["decision_ms"]["n"] > 0 and result["operator_ms"]["n"] > 0, result
    assert result["probe_decision_ms"]["n"] > 0 and result["probe_operator_ms"]["n"] > 0
    assert result["errors"] == {}, result["errors"]
    assert "lost 0" in done.stdout and "decision -> rank" in done.stdout
