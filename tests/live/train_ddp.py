"""A real data-parallel training for tests/test_ddp.py, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 train_ddp.py CONFIG.json

An MLP on scikit-learn's digits under DistributedDataParallel (gloo, CPU);
each rank draws its own batches and validates on its own shard, and attaches
lrpilot with no run, rank or world size given: they come from torchrun's
environment, as they would in a user's script.

Per rank, one JSON line per step goes to ``rank{R}.jsonl`` in ``out_dir`` as
soon as the step is done: ``{"step", "lrs", "val_loss"?}``, where ``lrs`` is
what the param groups hold after ``pilot.step`` (and ``pilot.report``): what
optimizer step ``step + 1`` uses. Each ``on_change`` callback adds
``{"event": "change", "step", "new", "reason", "actor"}``. At the end,
``summary{R}.json`` gets the run id, the pilot's stats, the lrpilot warnings
and a hash of the final parameters (DDP keeps them equal across ranks only
while every rank steps with the same LRs).

Config (JSON): ``data`` (an .npz with x, y), ``policy``, ``sync``,
``report_every``, ``max_steps``, ``stop_file`` (every rank stops after the
step at which rank 0 sees it), ``step_sleep`` (pace only), ``out_dir``,
``deadline_s``, ``hash_params`` (each ``change`` line and an ``attached``
line then carry ``params``, a hash of the parameters as they are then). The
daemon's address comes from ``$LRPILOT_DAEMON``.

Elastic restarts (tests/test_elastic.py; all off unless given):
``checkpoint`` (a path) and ``checkpoint_every`` (N): after every N-th step
rank 0 saves model, optimizer, ``pilot.state_dict()`` and the step (to a
temporary file, then renamed), and every rank waits for it at a barrier.
``fail_at`` (a step) and ``fail_rank``: on torchrun's first attempt only
(``$TORCHELASTIC_RESTART_COUNT`` 0) that rank exits abruptly (``os._exit(1)``)
right after that step. When the checkpoint exists at start, every rank loads
it (model, optimizer, then the pilot's state) and goes on from the step after
it; a line ``{"event": "resumed", "step", "lrs", "started"}`` then says the
checkpoint's step, the LRs the groups hold once it is loaded (those of the
step after it) and when this process started (``time.time()``). With either
feature on, ``rank{R}.jsonl`` is appended to (each attempt adds its lines)
and each line says its ``attempt`` (the restart count); the summary is the
last attempt's and says its ``attempt`` and ``first_step``.
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

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lrpilot

HIDDEN, BATCH = 64, 128


def main(config_path: str) -> None:
    started = time.time()
    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    deadline = time.monotonic() + config.get("deadline_s", 60)
    raw = np.load(config["data"])
    x = torch.tensor(raw["x"], dtype=torch.float32) / 16.0
    y = torch.tensor(raw["y"], dtype=torch.int64)
    x_train, y_train = x[:1400], y[:1400]
    x_val, y_val = x[1400 + rank :: world], y[1400 + rank :: world]  # this rank's shard

    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(
            torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10)
        )
    )
    body, head = model.module[0], model.module[2]
    optimizer = torch.optim.SGD(
        [
            {"params": body.parameters(), "lr": 0.2, "name": "body"},
            {"params": head.parameters(), "lr": 0.1, "name": "head"},
        ],
        momentum=0.9,
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(1000 + rank)
    checkpoint = Path(config["checkpoint"]) if config.get("checkpoint") else None
    elastic = checkpoint is not None or config.get("fail_at") is not None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    tag = {"attempt": attempt} if elastic else {}
    saved = None
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    first = saved["step"] + 1 if saved is not None else 1
    mode = "a" if elastic else "w"  # an attempt after the first adds its lines
    out = open(Path(config["out_dir"]) / f"rank{rank}.jsonl", mode, buffering=1)  # noqa: SIM115

    def changed(step, old, new, reason, actor) -> None:
        event = {"event": "change", "step": step, "new": new, "reason": reason, "actor": actor}
        if config.get("hash_params"):
            event["params"] = digest(model)  # as the change left them (a range test's end)
        out.write(json.dumps({**event, **tag}) + "\n")

    stop_file = Path(config["stop_file"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pilot = lrpilot.attach(
            optimizer,
            policy=config["policy"],
            sync=config.get("sync", False),
            sync_timeout=10.0,
            on_change=changed,
        )
        if config.get("hash_params"):
            out.write(json.dumps({"event": "attached", "params": digest(model)}) + "\n")
        if saved is not None:
            pilot.load_state_dict(saved["lrpilot"])
            lrs = [g["lr"] for g in optimizer.param_groups]
            resumed = {"event": "resumed", "step": saved["step"], "lrs": lrs, "started": started}
            out.write(json.dumps({**resumed, **tag}) + "\n")
        for k in range(first, config["max_steps"] + 1):
            idx = torch.randint(0, len(x_train), (BATCH,), generator=generator)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()  # gradients are all-reduced here: the ranks meet every step
            optimizer.step()
            pilot.step(loss=loss)
            record = {"step": k}
            if config["report_every"] and k % config["report_every"] == 0:
                with torch.no_grad():
                    record["val_loss"] = loss_fn(model(x_val), y_val).item()
                pilot.report(val_loss=record["val_loss"])
            record["lrs"] = [g["lr"] for g in optimizer.param_groups]
            out.write(json.dumps({**record, **tag}) + "\n")
            if checkpoint is not None and k % config["checkpoint_every"] == 0:
                if rank == 0:
                    save(checkpoint, model, optimizer, pilot, k)
                dist.barrier()  # every rank's next start sees this checkpoint
            if k == config.get("fail_at") and rank == config.get("fail_rank", 0) and attempt == 0:
                out.close()
                os._exit(1)  # a crash: no pilot.close(), no bye, nothing flushed
            # Rank 0 decides when to stop, and every rank stops at that step.
            stop = torch.tensor([float(rank == 0 and stop_file.exists())])
            dist.broadcast(stop, src=0)
            if stop.item():
                break
            if config.get("step_sleep"):
                time.sleep(config["step_sleep"])
            if time.monotonic() > deadline:
                sys.exit(f"train_ddp rank {rank}: deadline passed at step {k}")
        pilot.close()
    out.close()
    summary = {
        "run": pilot.run,
        "rank": pilot.rank,
        "world_size": pilot.world_size,
        "steps": k,
        "stats": asdict(pilot.stats),
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("lrpilot")],
        "params_sha256": digest(model),
    }
    if elastic:
        summary.update(attempt=attempt, first_step=first)
    Path(config["out_dir"], f"summary{rank}.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


def digest(model) -> str:
    """The parameters' bytes, hashed: equal only when bit-identical."""
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return hashlib.sha256(params.numpy().tobytes()).hexdigest()


def save(path: Path, model, optimizer, pilot, step: int) -> None:
    """A checkpoint of step ``step``, whole or not at all (written aside, renamed)."""
    state = {
        "model": model.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lrpilot": pilot.state_dict(),
        "step": step,
    }
    part = path.with_name(path.name + ".part")
    torch.save(state, part)
    os.replace(part, path)


if __name__ == "__main__":
    main(sys.argv[1])
