"""A real training process for the fault test (tests/test_faults.py): an MLP
on scikit-learn's digits, plain SGD with momentum, two param groups (body,
head), under ``lrpilot.attach`` in lock-step with a metric-driven policy (a
plateau on a validation loss reported every ``report_every`` steps). It
trains until ``stop_file`` exists, whatever happens to the daemon meanwhile.

Run as ``python train_faults.py CONFIG.json``. Config (JSON): ``address``,
``data`` (an .npz with x, y), ``run``, ``policy``, ``lrs``, ``sync``,
``sync_timeout``, ``report_every``, ``out``, ``stop_file``, ``summary``,
``deadline_s``, ``step_sleep`` (seconds after each step: pace only).

One JSON line per optimizer step goes to ``out`` as soon as the step is
done: ``{"step", "used"`` (the LRs in the param groups when
``optimizer.step()`` ran, read by a step pre-hook registered after
lrpilot's), ``"loss"``, ``"val_loss"``?, ``"lrs"`` (what the groups hold
after ``pilot.step``/``pilot.report``), ``"applied"`` (commands applied so
far), ``"t"`` (time.monotonic() at the end of the step), ``"rt"`` (seconds
spent in ``pilot.step`` and ``pilot.report``: the lock-step round trips)``}``.
``summary`` gets the pilot's stats and the lrpilot warnings at the end.
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

HIDDEN, BATCH = 64, 64


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    deadline = time.monotonic() + config.get("deadline_s", 60)
    raw = np.load(config["data"])
    x = torch.tensor(raw["x"], dtype=torch.float32) / 16.0
    y = torch.tensor(raw["y"], dtype=torch.int64)
    x_train, y_train, x_val, y_val = x[:1400], y[:1400], x[1400:], y[1400:]
    model = digits_mlp(HIDDEN)
    optimizer = body_head_sgd(model, *config["lrs"])
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    report_every = config["report_every"]
    stop_file = Path(config["stop_file"])
    used: list[list[float]] = []
    out = open(config["out"], "w", buffering=1)  # noqa: SIM115 - closed below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pilot = lrpilot.attach(
            optimizer,
            run=config["run"],
            policy=config["policy"],
            daemon=config["address"],
            sync=config.get("sync", True),
            sync_timeout=config.get("sync_timeout", 20.0),
        )
        # After lrpilot's own pre-hook (which puts its LRs back if anything
        # else wrote the groups): what this sees is what the step uses.
        optimizer.register_step_pre_hook(
            lambda opt, *_: used.append([g["lr"] for g in opt.param_groups])
        )
        k = 0
        while not stop_file.exists():
            k += 1
            idx = torch.randint(0, len(x_train), (BATCH,), generator=generator)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert len(used) == k
            record = {"step": k, "used": used[-1], "loss": loss.item()}
            began = time.monotonic()
            pilot.step(loss=record["loss"])
            if k % report_every == 0:
                with torch.no_grad():
                    val = loss_fn(model(x_val), y_val).item()
                record["val_loss"] = val
                pilot.report(val_loss=val)
            record["t"] = now = time.monotonic()
            record["rt"] = now - began
            record["lrs"] = [g["lr"] for g in optimizer.param_groups]
            record["applied"] = pilot.stats.commands_applied
            out.write(json.dumps(record) + "\n")
            if config.get("step_sleep"):
                time.sleep(config["step_sleep"])
            if now > deadline:
                sys.exit(f"train_faults: deadline passed at step {k}")
        pilot.close()
    out.close()
    summary = {
        "steps": k,
        "stats": asdict(pilot.stats),
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("lrpilot")],
    }
    Path(config["summary"]).write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
