"""One side of tests/test_range_test_vs_lightning.py, run as
``python range_test_vs_lightning.py CONFIG.json``: the same LR range test on
the same model, data and seed, by Lightning's ``Tuner.lr_find`` (``"side":
"lightning"``) or by lrpilot's ``range_test`` policy in a plain torch loop
against a real daemon (``"side": "lrpilot"``).

What the two sides share (built here, identically, in each process):

- the data: scikit-learn's digits (an .npz with x, y), one fixed permutation
  (numpy's generator, seed 0), scaled to [0, 1], served in order
  (``shuffle=False``) in batches of ``BATCH``: both see the same batches in
  the same order from the first one;
- the model: an MLP built right after ``torch.manual_seed(SEED)`` (the same
  initial weights; each side writes their hash);
- the optimizer: Adam (``lr`` 1e-3, which both sweeps replace), with one
  param group;
- torch on one thread, so that the same arithmetic gives the same bits.

Each side writes, to ``out`` (JSON): ``initial_sha`` (the initial
parameters), ``used_lrs`` (the group's LR at each optimizer step, read by an
optimizer step pre-hook: what the step used), ``raw_losses`` (each batch's
loss, before smoothing) and its own results.

Lightning (``min_lr``, ``max_lr``, ``steps``, ``diverge`` from the config):
``suggestion``, ``results`` (``lr``, ``loss``: Lightning's curve) and
``after_equal_initial`` (whether the parameters after ``lr_find``, restored
from its checkpoint, are those before it).

lrpilot (``address``, ``run``, ``policy``, ``after``: steps to take once the
sweep's end is applied): ``change`` (the ``on_change`` of the command that
ended the sweep: step, old, new, reason), ``sweep_steps`` (the optimizer
steps taken before it was applied), ``lr_after_end`` (group 0's LR right
after the ``pilot.step()`` that applied it), ``swept_equal_initial`` and
``after_equal_initial`` (``torch.equal``, parameter by parameter, of the
parameters right before and right after that ``pilot.step()`` with those
before the first sweep step), ``swept_sha`` and ``after_sha``,
``state_after_end`` (the optimizer's state right after: Adam's, empty when
the copy taken at ``attach()`` was a fresh optimizer's), and
``continued_equal_reference``: the parameters after the ``after`` steps that
followed the sweep, against a fresh model (same seed) and a fresh Adam
trained on the same batches at the same LRs (``torch.equal``): what the
training would be had the sweep never run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED, BATCH, HIDDEN = 0, 16, 64


def make_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10)
    )


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def loader(path: str) -> torch.utils.data.DataLoader:
    raw = np.load(path)
    order = np.random.default_rng(0).permutation(len(raw["y"]))
    x = torch.tensor(raw["x"][order], dtype=torch.float32) / 16.0
    y = torch.tensor(raw["y"][order], dtype=torch.int64)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def sha(params: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.numpy().tobytes())
    return digest.hexdigest()


def all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def record_lrs(optimizer: torch.optim.Optimizer, used: list[float]) -> None:
    """Append group 0's LR to ``used`` at every optimizer step, before it runs."""

    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        used.append(opt.param_groups[0]["lr"])

    optimizer.register_step_pre_hook(hook)


# --- Lightning ------------------------------------------------------------------


def lightning_side(config: dict) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    used: list[float] = []
    raw_losses: list[float] = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            raw_losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            optimizer = make_optimizer(self.parameters())
            record_lrs(optimizer, used)
            return optimizer

    module = Module()
    initial = params_of(module.net)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=config["work_dir"],
    )
    finder = Tuner(trainer).lr_find(
        module,
        train_dataloaders=loader(config["data"]),
        min_lr=config["min_lr"],
        max_lr=config["max_lr"],
        num_training=config["steps"],
        mode="exponential",
        early_stop_threshold=config["diverge"],
        update_attr=False,
    )
    assert finder is not None
    return {
        "initial_sha": sha(initial),
        "used_lrs": used,
        "raw_losses": raw_losses,
        "suggestion": finder.suggestion(),
        "results": {"lr": list(finder.results["lr"]), "loss": list(finder.results["loss"])},
        "after_equal_initial": all_equal(params_of(module.net), initial),
    }


# --- lrpilot ----------------------------------------------------------------------


def lrpilot_side(config: dict) -> dict:
    import lrpilot

    deadline = time.monotonic() + config.get("deadline_s", 60)
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    initial = params_of(model)
    changes: list[dict] = []

    def changed(step: int, old: list, new: list, reason: str, actor: str) -> None:
        changes.append({"step": step, "old": old, "new": new, "reason": reason, "actor": actor})

    pilot = lrpilot.attach(
        optimizer,
        run=config["run"],
        policy=config["policy"],
        daemon=config["address"],
        sync=True,
        sync_timeout=10.0,
        on_change=changed,
        model=model,
    )
    used: list[float] = []
    record_lrs(optimizer, used)  # after attach's own pre-hook: it sees what the step reads
    raw_losses: list[float] = []
    batches = iter(loader(config["data"]))
    out: dict[str, Any] = {"initial_sha": sha(initial), "used_lrs": used, "raw_losses": raw_losses}
    end_at: int | None = None  # optimizer steps taken when the sweep's end was applied
    after_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    while end_at is None or len(used) < end_at + config["after"]:
        if time.monotonic() > deadline:
            pilot.close()
            out["error"] = f"deadline passed after {len(used)} steps; changes: {changes}"
            return out
        x, y = next(batches)  # the first epoch has more batches than the sweep needs
        if end_at is not None:
            after_batches.append((x, y))
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        raw_losses.append(loss.item())
        swept = params_of(model)
        seen = len(changes)
        pilot.step(loss=loss.item())
        if end_at is None and len(changes) > seen:
            end_at = len(used)
            after = params_of(model)
            state = optimizer.state_dict()["state"]
            out.update(
                change=changes[-1],
                sweep_steps=end_at,
                lr_after_end=optimizer.param_groups[0]["lr"],
                swept_equal_initial=all_equal(swept, initial),
                after_equal_initial=all_equal(after, initial),
                swept_sha=sha(swept),
                after_sha=sha(after),
                state_after_end={str(k): sorted(v) for k, v in state.items()},
            )
    pilot.close()
    out["changes"] = changes
    # The same training had the sweep never run: a fresh model and optimizer
    # on the batches after it, at the LRs the pilot's steps used.
    reference = make_model()
    ref_optimizer = make_optimizer(reference.parameters())
    for (x, y), lr in zip(after_batches, used[end_at:]):
        ref_optimizer.param_groups[0]["lr"] = lr
        ref_optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        ref_optimizer.step()
    out["continued_equal_reference"] = all_equal(params_of(model), params_of(reference))
    return out


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    side = {"lightning": lightning_side, "lrpilot": lrpilot_side}[config["side"]]
    result = side(config)
    partial = Path(config["out"] + ".partial")
    partial.write_text(json.dumps(result))
    partial.replace(config["out"])


if __name__ == "__main__":
    main(sys.argv[1])
