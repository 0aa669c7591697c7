"""Real Lightning fits for tests/test_lightning.py, run as
``python train_lightning.py CONFIG.json``.

A small MLP on scikit-learn's digits (two param groups, body and head; plain
SGD with momentum), trained by ``lightning.pytorch.Trainer`` on CPU with
``LRPilotCallback`` steering the LR, ``LearningRateMonitor`` logging it to an
in-memory logger, and gradient accumulation. The data are a fixed permutation
served in order, so two fits of the same config train the same model step for
step, and a resumed fit the same as one never stopped.

Config (JSON): ``data`` (an .npz with x, y), ``out_dir``, ``deadline_s``,
``strategy`` and ``devices`` (Lightning's; "ddp" with 2 runs two CPU ranks,
Lightning's launcher starting this script again for rank 1), and ``fits``, run
one after the other, each with ``name``, ``address``, ``run`` (null: the
callback's default), ``policy``, ``sync``, ``max_epochs``, ``accumulate``;
optionally ``checkpoint_dir`` (a ModelCheckpoint saving every epoch),
``resume`` (the ckpt_path to resume from) and ``gate`` (``after_applied``:
after the first step at which the pilot has applied that many commands,
rank 0 writes ``paused_file`` and waits for ``go_file``).

Per fit and rank, ``{name}.rank{R}.jsonl`` in ``out_dir`` gets one JSON line
per event, as it happens:

- ``{"event": "used", "step", "lrs"}``: the LRs in the param groups when
  optimizer step ``step`` ran (an optimizer step pre-hook registered after
  lrpilot's, so it sees what the step reads);
- ``{"event": "logged", "step", "lrs"}``: what LearningRateMonitor logged at
  ``step`` (Lightning's count of optimizer steps taken before the batch);
- ``{"event": "batch", "step", "loss"}``: each batch's training loss, with
  the optimizer step it is part of;
- ``{"event": "val", "step", "val_loss", "sanity"}``: each validation's
  val_loss as the callback sees it;
- ``{"event": "change", "step", "old", "new", "reason", "actor"}``: the
  pilot's ``on_change`` (passed through the callback's ``attach_kwargs``).

``{name}.summary{R}.json``: the run id, rank, world size, global step, the
pilot's stats, the lrpilot warnings, the checkpoints written and a hash of the
final parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from lrpilot.integrations.lightning import LRPilotCallback

HIDDEN, BATCH, TRAIN = 32, 50, 1400
BASE_LRS = [0.2, 0.1]


class Digits(pl.LightningModule):
    def __init__(self, out) -> None:
        super().__init__()
        self.body = torch.nn.Linear(64, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, 10)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.out = out

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.out({"event": "batch", "step": self.trainer.global_step + 1, "loss": loss.item()})
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self):
        body_lr, head_lr = BASE_LRS
        return torch.optim.SGD(
            [
                {"params": self.body.parameters(), "lr": body_lr, "name": "body"},
                {"params": self.head.parameters(), "lr": head_lr, "name": "head"},
            ],
            momentum=0.9,
        )


class MemoryLogger(Logger):
    """Where LearningRateMonitor's values go: the LRs as a user's dashboard
    would get them, written out as they come."""

    def __init__(self, out) -> None:
        super().__init__()
        self.out = out

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        lrs = [metrics.get(f"lr-SGD/{group}") for group in ("body", "head")]
        if None not in lrs:
            self.out({"event": "logged", "step": step, "lrs": lrs})


class Recorder(pl.Callback):
    """The LRs each optimizer step used, and what each validation reported."""

    def __init__(self, out) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        # Registered after lrpilot's pre-hook (the callback attaches in
        # on_fit_start), so it runs last and sees the LRs the step reads.
        def used(optimizer, args, kwargs) -> None:
            lrs = [group["lr"] for group in optimizer.param_groups]
            self.out({"event": "used", "step": trainer.global_step + 1, "lrs": lrs})

        trainer.optimizers[0].register_step_pre_hook(used)

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("val_loss")
        if value is not None:
            event = {"event": "val", "step": trainer.global_step, "val_loss": float(value)}
            self.out({**event, "sanity": trainer.sanity_checking})


class Gate(pl.Callback):
    """Rank 0 stops once the pilot has applied ``after_applied`` commands, and
    goes on when the test says so (the other ranks wait in DDP's next
    all-reduce)."""

    def __init__(self, pilot_callback: LRPilotCallback, gate: dict, deadline: float) -> None:
        self.pilot_callback, self.gate, self.deadline = pilot_callback, gate, deadline
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pilot = self.pilot_callback.pilot
        if self.done or trainer.global_rank != 0 or pilot is None:
            return
        if pilot.stats.commands_applied < self.gate.get("after_applied", 0):
            return
        if trainer.global_step < self.gate.get("after_step", 0):
            return
        self.done = True
        partial = Path(self.gate["paused_file"] + ".partial")
        partial.write_text(json.dumps({"step": trainer.global_step, "run": pilot.run}))
        partial.replace(self.gate["paused_file"])  # whole or not at all
        go = Path(self.gate["go_file"])
        while not go.exists():
            if time.monotonic() > self.deadline:
                sys.exit("train_lightning: the go file did not appear before the deadline")
            time.sleep(0.01)


def loaders(path: str) -> tuple[DataLoader, DataLoader]:
    raw = np.load(path)
    order = np.random.default_rng(0).permutation(len(raw["y"]))
    x = torch.tensor(raw["x"][order], dtype=torch.float32) / 16.0
    y = torch.tensor(raw["y"][order], dtype=torch.int64)
    train = TensorDataset(x[:TRAIN], y[:TRAIN])
    val = TensorDataset(x[TRAIN:], y[TRAIN:])
    # In order: a resumed fit sees the batches the uninterrupted one saw.
    return (
        DataLoader(train, batch_size=BATCH, shuffle=False),
        DataLoader(val, batch_size=len(val), shuffle=False),
    )


def run_fit(config: dict, fit: dict, deadline: float) -> None:
    out_dir = Path(config["out_dir"])
    # Lightning's DDP launcher gives the ranks it starts their LOCAL_RANK (one node).
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sink = open(out_dir / f"{fit['name']}.rank{rank}.jsonl", "w", buffering=1)  # noqa: SIM115

    def out(obj: dict) -> None:
        sink.write(json.dumps(obj) + "\n")

    def changed(step, old, new, reason, actor) -> None:
        event = {"event": "change", "step": step, "old": old, "new": new}
        out({**event, "reason": reason, "actor": actor})

    pl.seed_everything(0, verbose=False)
    model = Digits(out)
    pilot_callback = LRPilotCallback(
        policy=fit["policy"],
        monitor="val_loss",
        run=fit.get("run"),
        daemon=fit["address"],
        sync=fit.get("sync", False),
        sync_timeout=10.0,
        on_change=changed,
    )
    callbacks: list[pl.Callback] = [
        pilot_callback,
        LearningRateMonitor(logging_interval="step"),
        Recorder(out),
    ]
    if fit.get("gate"):
        callbacks.append(Gate(pilot_callback, fit["gate"], deadline))
    checkpoint = None
    if fit.get("checkpoint_dir"):
        checkpoint = ModelCheckpoint(
            dirpath=fit["checkpoint_dir"], filename="{epoch}", save_top_k=-1, every_n_epochs=1
        )
        callbacks.append(checkpoint)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=config.get("devices", 1),
        strategy=config.get("strategy", "auto"),
        max_epochs=fit["max_epochs"],
        accumulate_grad_batches=fit["accumulate"],
        callbacks=callbacks,
        logger=MemoryLogger(out),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    train, val = loaders(config["data"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train, val, ckpt_path=fit.get("resume"))
    sink.close()
    pilot = pilot_callback.pilot
    assert pilot is not None
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    summary = {
        "run": pilot.run,
        "rank": pilot.rank,
        "world_size": pilot.world_size,
        "global_step": trainer.global_step,
        "pilot_step": pilot.step_count,
        "stats": asdict(pilot.stats),
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("lrpilot")],
        "checkpoints": sorted(p.name for p in Path(fit["checkpoint_dir"]).iterdir())
        if checkpoint is not None
        else [],
        "params_sha256": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
    }
    (out_dir / f"{fit['name']}.summary{rank}.json").write_text(json.dumps(summary))


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    deadline = time.monotonic() + config.get("deadline_s", 120)
    for fit in config["fits"]:
        run_fit(config, fit, deadline)
        if time.monotonic() > deadline:
            sys.exit(f"train_lightning: deadline passed after fit {fit['name']}")


if __name__ == "__main__":
    main(sys.argv[1])
