"""A real Accelerate training loop under ``lrpilot.attach``, for
tests/test_accelerate.py: run as ``python train_accelerate.py CONFIG.json``.

``Accelerator(cpu=True, gradient_accumulation_steps=N)``, a small MLP, SGD,
a prepared DataLoader of in-memory data, ``accelerator.accumulate(model)``
around every batch and ``pilot.step(loss=...)`` after every batch, as the
docs show it: the pilot counts the optimizer's real steps (one per N
batches). The pilot is attached to ``accelerator.prepare(optimizer)`` and
registered with ``accelerator.register_for_checkpointing``, so
``save_state``/``load_state`` carry it.

Output: one JSON line per batch to ``out``, ``{"batch", "loss"}``, and one
per real optimizer step, ``{"step", "lrs"}``: the LRs the optimizer used, read
by an optimizer step pre-hook registered after the pilot's. At the end,
``summary``: the pilot's stats and step count, the real steps the loop saw
(``accelerator.sync_gradients``), the pilot's step after ``load_state``, and
the lrpilot warnings seen.

Config (JSON): ``address``, ``run``, ``policy``, ``sync``, ``lr``,
``accumulation``, ``epochs``, ``eval_every`` (real steps), ``deadline_s``,
``out``, ``summary``; ``save_at`` with ``save_dir`` (``save_state`` after
that real step); ``resume_from`` with ``resume_step`` (``load_state`` before
the loop; the loop goes on from that real step); ``gate_dir`` with ``gates``
(after real step K write at-K and wait for go-K).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator

import lrpilot
from lrpilot.hook import innermost

BATCH, TRAIN, VAL, FEATURES = 8, 256, 64, 16


def data() -> tuple[torch.utils.data.TensorDataset, torch.Tensor, torch.Tensor]:
    """Random inputs with random labels: the validation loss soon stops
    improving, so a plateau on it cuts during the run."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(TRAIN + VAL, FEATURES, generator=generator)
    y = torch.randint(0, 2, (TRAIN + VAL,), generator=generator)
    return torch.utils.data.TensorDataset(x[:TRAIN], y[:TRAIN]), x[TRAIN:], y[TRAIN:]


def gate(config: dict, k: int, deadline: float) -> None:
    gate_dir = Path(config["gate_dir"])
    partial = gate_dir / f"at-{k}.partial"
    partial.write_text(json.dumps({"step": k}))
    partial.replace(gate_dir / f"at-{k}")
    while not (gate_dir / f"go-{k}").exists():
        if time.monotonic() > deadline:
            sys.exit(f"train_accelerate: no go for gate {k} before the deadline")
        time.sleep(0.01)


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    deadline = time.monotonic() + config.get("deadline_s", 60)
    out = open(config["out"], "w", buffering=1)  # noqa: SIM115 - closed at the end

    def write(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=config["accumulation"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    train, x_val, y_val = data()
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = torch.nn.CrossEntropyLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pilot = lrpilot.attach(
            optimizer,
            run=config["run"],
            policy=config["policy"],
            daemon=config["address"],
            sync=config["sync"],
            sync_timeout=10.0,
        )
        accelerator.register_for_checkpointing(pilot)
        real = 0
        if config.get("resume_from"):
            accelerator.load_state(config["resume_from"])
            real = config["resume_step"]
        resumed_at = pilot.step_count

        # After the pilot's pre-hook: the LRs this step reads.
        def used(opt, *_):
            used.step += 1
            write({"step": used.step, "lrs": [g["lr"] for g in opt.param_groups]})

        used.step = real
        innermost(optimizer).register_step_pre_hook(used)

        batches_per_epoch = len(loader)
        done = real * config["accumulation"]  # batches behind us
        batch = done
        for epoch in range(config["epochs"]):
            skip = done - epoch * batches_per_epoch
            if skip >= batches_per_epoch:
                continue
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip > 0 else loader
            for x, y in epoch_loader:
                with accelerator.accumulate(model):
                    loss = loss_fn(model(x), y)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                batch += 1
                write({"batch": batch, "loss": loss.item()})
                pilot.step(loss=loss.item())
                if not accelerator.sync_gradients:
                    continue
                real += 1
                if real % config["eval_every"] == 0:
                    with torch.no_grad():
                        val = loss_fn(model(x_val), y_val).item()
                    pilot.report(val_loss=val)
                if real == config.get("save_at"):
                    accelerator.save_state(config["save_dir"])
                if real in config.get("gates", ()):
                    gate(config, real, deadline)
                if time.monotonic() > deadline:
                    sys.exit(f"train_accelerate: deadline passed at real step {real}")
        pilot.close()
    out.close()
    summary = {
        "stats": asdict(pilot.stats),
        "pilot_steps": pilot.step_count,
        "real_steps": real,
        "batches": batch,
        "resumed_at": resumed_at,
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("lrpilot")],
    }
    Path(config["summary"]).write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
