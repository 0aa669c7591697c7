"""A real training that meets a corrupted batch, for tests/test_guard_training.py.

An MLP on scikit-learn's digits, SGD with momentum, under ``lrpilot.attach``
in lock-step (``sync=True``); run as ``python train_guard.py CONFIG.json``.
Each run of the config trains from the same seed on the same data and the
same batches, one after the other in this one process (torch's import is
paid once). At step ``inject.step`` the batch is corrupted: its inputs
multiplied by ``inject.factor`` (``"kind": "scale"``) or one pixel made NaN
(``"kind": "nan"``).

The loop does what docs/hook.md shows: it keeps an in-memory copy of the
model and optimizer every ``save_every`` steps, and when ``pilot.tripped`` is
set after ``pilot.step()`` it loads that copy back (so the bad batch's update
is undone: the step is skipped) and saves nothing at that step.

Per run, one JSON line per step to its ``out`` file: ``{"step", "loss",
"lrs", "tripped", "trips"}`` plus ``"reloaded": S`` (the step of the copy it
loaded), ``"saved": true``, ``"val_loss"``/``"val_acc"`` every ``val_every``
steps. ``lrs`` are the LRs optimizer step ``step`` used (read by an optimizer
pre-hook registered after lrpilot's, so after lrpilot has written them);
``tripped`` is ``pilot.tripped`` right after that step's ``pilot.step()``
(``{"step", "cause", "metric", "value"}`` or null). The last line is
``{"event": "end", "val_loss", "val_acc", "last_losses", "trips", "stats",
"warnings"}``: the final validation, the mean training loss of the last 10
steps, the pilot's stats and the lrpilot warnings seen during the run.

Config (JSON): ``address``, ``data`` (an .npz with x, y), ``steps``,
``save_every``, ``val_every``, ``lrs`` (groups body, head), ``deadline_s``,
``runs`` (each ``run``, ``policy``, ``inject`` ({"step", "kind",
"factor"?}) and ``out``).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from mlp import body_head_sgd, digits_mlp

import lrpilot

SEED, HIDDEN, BATCH, TRAIN = 0, 128, 64, 1400


def load(path: str) -> dict:
    """The digits, in [0, 1], in a fixed shuffled order: 1400 to train on,
    the remaining 397 to validate on."""
    raw = np.load(path)
    x = torch.tensor(raw["x"], dtype=torch.float32) / 16.0
    y = torch.tensor(raw["y"], dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    x, y = x[order], y[order]
    return {"x": x[:TRAIN], "y": y[:TRAIN], "x_val": x[TRAIN:], "y_val": y[TRAIN:]}


def corrupt(batch: torch.Tensor, inject: dict) -> torch.Tensor:
    if inject["kind"] == "scale":
        return batch * inject["factor"]
    if inject["kind"] == "nan":
        batch = batch.clone()
        batch[0, 0] = float("nan")
        return batch
    raise SystemExit(f"train_guard: unknown inject kind {inject['kind']!r}")


def evaluate(model: torch.nn.Module, data: dict) -> tuple[float, float]:
    with torch.no_grad():
        out = model(data["x_val"])
        loss = torch.nn.functional.cross_entropy(out, data["y_val"]).item()
        accuracy = (out.argmax(1) == data["y_val"]).float().mean().item()
    return loss, accuracy


def saved(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict:
    return {
        "step": step,
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


def train(spec: dict, config: dict, data: dict, deadline: float) -> None:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = digits_mlp(HIDDEN)
    optimizer = body_head_sgd(model, *config["lrs"])
    inject = spec["inject"]
    out = open(spec["out"], "w", buffering=1)  # noqa: SIM115 - closed below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pilot = lrpilot.attach(
            optimizer,
            run=spec["run"],
            policy=spec["policy"],
            daemon=config["address"],
            sync=True,
            sync_timeout=10.0,
        )
        used: list[list[float]] = []
        # After lrpilot's own pre-hook: the LRs this optimizer step uses.
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: used.append([g["lr"] for g in opt.param_groups])
        )
        good = saved(model, optimizer, 0)
        losses = []
        for k in range(1, config["steps"] + 1):
            idx = torch.randint(0, len(data["x"]), (BATCH,), generator=generator)
            batch = data["x"][idx]
            if k == inject["step"]:
                batch = corrupt(batch, inject)
            loss = torch.nn.functional.cross_entropy(model(batch), data["y"][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            value = loss.item()
            losses.append(value)
            pilot.step(loss=value)
            trip = pilot.tripped
            line = {
                "step": k,
                "loss": value,
                "lrs": used[-1],
                "tripped": None if trip is None else asdict(trip),
                "trips": pilot.trips,
            }
            if trip is not None:
                model.load_state_dict(good["model"])
                optimizer.load_state_dict(good["optimizer"])
                line["reloaded"] = good["step"]
            elif k % config["save_every"] == 0:
                good = saved(model, optimizer, k)
                line["saved"] = True
            if k % config["val_every"] == 0:
                line["val_loss"], line["val_acc"] = evaluate(model, data)
            out.write(json.dumps(line) + "\n")
            if time.monotonic() > deadline:
                sys.exit(f"train_guard: deadline passed at step {k} of {spec['run']}")
        pilot.close()
    val_loss, val_acc = evaluate(model, data)
    end = {
        "event": "end",
        "run": spec["run"],
        "val_loss": val_loss,
        "val_acc": val_acc,
        "last_losses": math.fsum(losses[-10:]) / 10,
        "trips": pilot.trips,
        "stats": asdict(pilot.stats),
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("lrpilot")],
    }
    out.write(json.dumps(end) + "\n")
    out.close()


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    deadline = time.monotonic() + config.get("deadline_s", 60)
    data = load(config["data"])
    for spec in config["runs"]:
        train(spec, config, data, deadline)


if __name__ == "__main__":
    main(sys.argv[1])
