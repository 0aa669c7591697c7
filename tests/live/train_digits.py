"""A real training process for the live-loop tests (tests/test_live_loop.py).

Small MLPs on scikit-learn's digits, plain SGD with momentum, each optimizer
under ``lrpilot.attach``; run as ``python train_digits.py CONFIG.json``.
Several trainers (one model, optimizer and pilot each) step in lock-step in
one process, which pays torch's import once for several runs.

Per trainer, one JSON line per step goes to its ``out`` file as soon as the
step is done: ``{"step", "loss", "val_loss"?, "lrs", "momenta", "applied"}``,
where ``lrs``/``momenta`` are what the param groups hold after ``pilot.step``
(and ``pilot.report``): what optimizer step ``step + 1`` uses. Each
``on_change`` callback adds ``{"event": "change", "step", "old", "new",
"reason", "actor"}``. At the end, ``summary`` gets every pilot's stats and the
lrpilot warnings the process saw.

Config (JSON): ``address``, ``data`` (an .npz with x, y), ``steps``,
``trainers`` (``run``, ``policy``, ``sync``, ``report_every``, ``lrs`` (two
groups: body, head), ``out``), ``summary``, ``deadline_s``; optionally
``pause_at`` with ``paused_file`` and ``go_file`` (after that step, write
``paused_file`` and wait for ``go_file``), and ``until_applied`` (a run name:
after the pause, stop ``extra_steps`` steps after that run's pilot has applied
a command it did not have at the pause); ``stop_file`` (stop after the step
at which that file exists: a training that stays connected while a test
watches it) and ``step_sleep`` (seconds after each step, pace only).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from mlp import body_head_sgd, digits_mlp

import lrpilot

HIDDEN, BATCH = 128, 256


class Trainer:
    def __init__(self, spec: dict, address: str, data: dict, seed: int) -> None:
        torch.manual_seed(seed)
        self.run = spec["run"]
        self.report_every = spec.get("report_every", 0)
        self.x_train, self.y_train, self.x_val, self.y_val = (
            data["x_train"],
            data["y_train"],
            data["x_val"],
            data["y_val"],
        )
        self.model = digits_mlp(HIDDEN)
        self.optimizer = body_head_sgd(self.model, *spec["lrs"])
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.generator = torch.Generator().manual_seed(seed)
        self.out = open(spec["out"], "w", buffering=1)  # noqa: SIM115 - closed in close()
        self.pilot = lrpilot.attach(
            self.optimizer,
            run=self.run,
            policy=spec.get("policy"),
            daemon=address,
            sync=spec.get("sync", False),
            sync_timeout=spec.get("sync_timeout", 10.0),
            on_change=self.changed,
        )

    def changed(self, step, old, new, reason, actor) -> None:
        event = {"event": "change", "step": step, "old": old, "new": new}
        self.write({**event, "reason": reason, "actor": actor})

    def write(self, obj: dict) -> None:
        self.out.write(json.dumps(obj) + "\n")

    def step(self, k: int) -> None:
        idx = torch.randint(0, len(self.x_train), (BATCH,), generator=self.generator)
        loss = self.loss_fn(self.model(self.x_train[idx]), self.y_train[idx])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        record = {"step": k, "loss": loss.item()}
        self.pilot.step(loss=record["loss"])
        if self.report_every and k % self.report_every == 0:
            with torch.no_grad():
                val = self.loss_fn(self.model(self.x_val), self.y_val).item()
            self.pilot.report(val_loss=val)
            record["val_loss"] = val
        groups = self.optimizer.param_groups
        record["lrs"] = [g["lr"] for g in groups]
        record["momenta"] = [g["momentum"] for g in groups]
        record["applied"] = self.pilot.stats.commands_applied
        self.write(record)

    def close(self) -> None:
        self.pilot.close()
        self.out.close()


def wait_for_file(path: Path, deadline: float) -> None:
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"train_digits: {path} did not appear before the deadline")
        time.sleep(0.01)


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    deadline = time.monotonic() + config.get("deadline_s", 60)
    raw = np.load(config["data"])
    x = torch.tensor(raw["x"], dtype=torch.float32) / 16.0
    y = torch.tensor(raw["y"], dtype=torch.int64)
    data = {"x_train": x[:1400], "y_train": y[:1400], "x_val": x[1400:], "y_val": y[1400:]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainers = [
            Trainer(spec, config["address"], data, seed=i)
            for i, spec in enumerate(config["trainers"])
        ]
        by_run = {t.run: t for t in trainers}
        pause_at = config.get("pause_at")
        watched = by_run.get(config.get("until_applied", ""))
        applied_at_pause, extra = None, config.get("extra_steps", 20)
        stop_file = Path(config["stop_file"]) if config.get("stop_file") else None
        for k in range(1, config["steps"] + 1):
            for trainer in trainers:
                trainer.step(k)
            if k == pause_at:
                stats = {t.run: asdict(t.pilot.stats) for t in trainers}
                # Whole or not at all: the test reads it as soon as it exists.
                partial = Path(config["paused_file"] + ".partial")
                partial.write_text(json.dumps({"step": k, "stats": stats}))
                partial.replace(config["paused_file"])
                wait_for_file(Path(config["go_file"]), deadline)
                if watched is not None:
                    applied_at_pause = watched.pilot.stats.commands_applied
            if applied_at_pause is not None and (
                watched.pilot.stats.commands_applied > applied_at_pause
            ):
                extra -= 1
                if extra <= 0:
                    break
            if stop_file is not None and stop_file.exists():
                break
            if config.get("step_sleep"):
                time.sleep(config["step_sleep"])
            if time.monotonic() > deadline:
                sys.exit(f"train_digits: deadline passed at step {k}")
        for trainer in trainers:
            trainer.close()
    summary = {
        "steps": k,
        "stats": {t.run: asdict(t.pilot.stats) for t in trainers},
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("lrpilot")],
    }
    Path(config["summary"]).write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
