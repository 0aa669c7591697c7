"""The live scripts' model: an MLP on scikit-learn's digits (64 pixels, 10
classes) and SGD with momentum over two named param groups, "body" (the
first layer) and "head" (the last), each at its own LR. Imported by the
scripts in this folder (their folder is on sys.path when run by path)."""

from __future__ import annotations

import torch


def digits_mlp(hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )


def body_head_sgd(model: torch.nn.Sequential, body_lr: float, head_lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": body_lr, "name": "body"},
            {"params": model[2].parameters(), "lr": head_lr, "name": "head"},
        ],
        momentum=0.9,
    )
