"""Record the example metric stream bundled with lrpilot (client/data/).

A real run: a small MLP on scikit-learn's bundled digits, SGD at a constant
LR, loss every step and val_loss every 25 steps. Deterministic (seeded), so
re-running it rewrites the same file. Used by `lrpilot demo` and the docs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent.parent / "client" / "data" / "example_metrics.jsonl"
STEPS, BATCH, EVAL_EVERY = 800, 32, 25


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_val, y_val = x[:1400], y[:1400], x[1400:], y[1400:]
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    lines = []
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, len(x_train), (BATCH,), generator=generator)
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = {"loss": round(loss.item(), 6)}
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                metrics["val_loss"] = round(loss_fn(model(x_val), y_val).item(), 6)
        lines.append(json.dumps({"step": step, "metrics": metrics}))
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} records to {OUT}")


if __name__ == "__main__":
    main()
