"""A training process whose metrics are a fixed stream, for the operator and
recovery tests (tests/test_operations.py, tests/test_recovery.py).

No model: the optimizer is plain param groups (what ``lrpilot.attach``
duck-types), and the loss and validation loss of step k are a pure function
of (seed, k). So the same seed gives the same metric stream in every process,
before and after a crash or a checkpoint, and the process starts in half a
second (no torch import). Run as ``python train_stream.py CONFIG.json``.

Config (JSON):

- ``steps``: the last step; ``report_every``: ``pilot.report(val_loss=...)``
  after steps that are multiples of it; ``seed``;
- ``gates`` (steps) and ``gate_dir``: after step k (and its report) write
  ``at-K`` there and wait for ``go-K`` (the test's hand on the clock);
- ``step_sleep`` (seconds, pace only), ``deadline_s``, ``summary`` (path);
- ``trainers``: ``run``, ``address``, ``policy``, ``sync``, ``sync_timeout``,
  ``lrs`` (one per group; groups are named ``body``, ``head``, ...), ``out``;
  optionally ``save_at`` + ``save_to`` (after that step, write
  ``{"step", "pilot": pilot.state_dict()}``) and ``load_from`` (attach, then
  ``pilot.load_state_dict`` from such a file and go on from its step).

Per trainer, one JSON line per step in ``out``: ``{"step", "used"`` (the LRs
optimizer step k used), ``"lrs"`` (what the groups hold after ``pilot.step``
and ``pilot.report``: what step k + 1 uses), ``"loss"``, ``"val_loss"``?,
``"applied"`` (commands applied so far)``}``. ``summary`` gets every pilot's
stats and the lrpilot warnings the process saw.
"""

from __future__ import annotations

import json
import random
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import lrpilot

GROUP_NAMES = ("body", "head", "embed")


def loss_at(seed: int, k: int) -> float:
    return 2.0 / (1 + k / 50) + 0.05 * random.Random(f"{seed}-loss-{k}").random()


def val_loss_at(seed: int, k: int) -> float:
    # A slow trend under noise: a plateau policy finds plateaus every few reports.
    return 1.0 + 1.0 / (1 + k / 30) + 0.2 * random.Random(f"{seed}-val-{k}").random()


class Optimizer:
    def __init__(self, lrs: list[float]) -> None:
        self.param_groups = [
            {"params": [], "lr": lr, "name": GROUP_NAMES[i]} for i, lr in enumerate(lrs)
        ]


class Trainer:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.optimizer = Optimizer(spec["lrs"])
        self.pilot = lrpilot.attach(
            self.optimizer,
            run=spec["run"],
            policy=spec.get("policy"),
            daemon=spec["address"],
            sync=spec.get("sync", False),
            sync_timeout=spec.get("sync_timeout", 10.0),
        )
        if spec.get("load_from"):
            saved = json.loads(Path(spec["load_from"]).read_text())
            self.pilot.load_state_dict(saved["pilot"])
            assert self.pilot.step_count == saved["step"]
        self.out = open(spec["out"], "a", buffering=1)  # noqa: SIM115 - closed in close()

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self, k: int, seed: int, report_every: int) -> None:
        assert self.pilot.step_count == k - 1
        record = {"step": k, "used": self.lrs(), "loss": loss_at(seed, k)}
        self.pilot.step(loss=record["loss"])
        if report_every and k % report_every == 0:
            record["val_loss"] = val_loss_at(seed, k)
            self.pilot.report(val_loss=record["val_loss"])
        record["lrs"] = self.lrs()
        record["applied"] = self.pilot.stats.commands_applied
        self.out.write(json.dumps(record) + "\n")
        if self.spec.get("save_at") == k:
            state = {"step": k, "pilot": self.pilot.state_dict()}
            Path(self.spec["save_to"]).write_text(json.dumps(state))

    def close(self) -> None:
        self.pilot.close()
        self.out.close()


def wait_for_file(path: Path, deadline: float) -> None:
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"train_stream: {path} did not appear before the deadline")
        time.sleep(0.005)


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    deadline = time.monotonic() + config.get("deadline_s", 60)
    seed, report_every = config.get("seed", 0), config.get("report_every", 0)
    gates, gate_dir = set(config.get("gates", [])), Path(config.get("gate_dir", "."))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainers = [Trainer(spec) for spec in config["trainers"]]
        starts = {t.pilot.step_count for t in trainers}
        assert len(starts) == 1, f"trainers start at different steps: {starts}"
        first = starts.pop() + 1
        for k in range(first, config["steps"] + 1):
            for trainer in trainers:
                trainer.step(k, seed, report_every)
            if k in gates:
                # Written whole, then renamed: the test reads it the moment it exists.
                ready = gate_dir / f".at-{k}"
                ready.write_text(
                    json.dumps({t.spec["run"]: asdict(t.pilot.stats) for t in trainers})
                )
                ready.replace(gate_dir / f"at-{k}")
                wait_for_file(gate_dir / f"go-{k}", deadline)
            if config.get("step_sleep"):
                time.sleep(config["step_sleep"])
            if time.monotonic() > deadline:
                sys.exit(f"train_stream: deadline passed at step {k}")
        for trainer in trainers:
            trainer.close()
    summary = {
        "first": first,
        "stats": {t.spec["run"]: asdict(t.pilot.stats) for t in trainers},
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("lrpilot")],
    }
    Path(config["summary"]).write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
