"""A small real training that keeps going, for tests that watch a live run
(tests/test_top.py): a linear regression in torch, two param groups (weight,
bias), under ``lrpilot.attach`` with a plateau policy on the loss.

Run as ``python train_tiny.py ADDRESS RUN SECONDS``: it trains until SECONDS
have passed (or it is killed), at most ~200 steps a second so the step count
stays readable, writing one line ``step N`` to stdout every 100 steps.
"""

from __future__ import annotations

import sys
import time

import torch

import lrpilot

PLATEAU = {
    "kind": "plateau",
    "metric": "loss",
    "factor": 0.5,
    "patience": 100,
    "threshold": 0.01,
    "min_lr": 0.001,
}
STEP_S = 0.005  # pace, not synchronisation: keeps the run from racing ahead


def main(address: str, run: str, seconds: float) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1) + 0.5 * torch.randn(512, 1)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(
        [
            {"params": [model.weight], "lr": 0.05, "name": "weight"},
            {"params": [model.bias], "lr": 0.01, "name": "bias"},
        ]
    )
    generator = torch.Generator().manual_seed(0)
    end = time.monotonic() + seconds
    with lrpilot.attach(optimizer, run=run, policy=PLATEAU, daemon=address) as pilot:
        step = 0
        while time.monotonic() < end:
            idx = torch.randint(0, len(x), (32,), generator=generator)
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pilot.step(loss=loss.item())
            step += 1
            if step % 100 == 0:
                print(f"step {step}", flush=True)
            time.sleep(STEP_S)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
