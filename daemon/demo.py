"""``lrpilot demo``: what lrpilot's policies do to a real training's LR.

Replays the bundled metric stream (a real run: an MLP on scikit-learn's
digits, recorded by scripts/make_example_metrics.py) through a few policies,
prints the LR each gives as the run goes, every change with its reason, and a
summary. The live daemon-plus-training demo replaces this replay later.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources

from lrpilot.policies import Policy, parse_policy

from .simulate import MetricRecord, numbered_records

BASE_LR = 0.05
PATIENCE = 2  # evaluations without improvement before a plateau cut
POLICIES: dict[str, dict] = {
    "plateau(val_loss)": {
        "kind": "plateau",
        "metric": "val_loss",
        "patience": PATIENCE,
        "factor": 0.5,
    },
    "warmup→plateau": {
        "kind": "sequential",
        "policies": [
            {"kind": "linear", "start_factor": 0.1, "total_iters": 100},
            {"kind": "plateau", "metric": "val_loss", "patience": PATIENCE, "factor": 0.5},
        ],
        "milestones": [100],
    },
    "warmup→cosine": {
        "kind": "sequential",
        "policies": [
            {"kind": "linear", "start_factor": 0.1, "total_iters": 100},
            {"kind": "cosine", "T_max": 700},
        ],
        "milestones": [100],
    },
    "onecycle": {"kind": "onecycle", "max_lr": 0.1, "total_steps": 800},
    "cyclic(tri2)": {
        "kind": "cyclic",
        "base_lr": 0.005,
        "max_lr": 0.1,
        "step_size_up": 100,
        "mode": "triangular2",
    },
}
# The policies whose LR moves only when val_loss says so; the others move every step.
METRIC_DRIVEN = ("plateau(val_loss)", "warmup→plateau")
PRINT_EVERY = 50


def example_records() -> Iterator[MetricRecord]:
    path = resources.files("lrpilot") / "data" / "example_metrics.jsonl"
    with path.open() as lines:
        for _, record in numbered_records(lines):
            yield record


def main(steps: int | None = None) -> None:
    policies: dict[str, Policy] = {
        name: parse_policy(spec).build([BASE_LR]) for name, spec in POLICIES.items()
    }
    width = max(14, *(len(name) for name in policies))
    print(
        f"lrpilot demo: replaying a recorded training run (base LR {BASE_LR}) through "
        f"{len(policies)} policies\n"
    )
    header = f"{'step':>5} {'loss':>8} {'val_loss':>9}  " + " ".join(
        f"{name:>{width}}" for name in policies
    )
    print(header)
    print("-" * len(header))
    changes: list[str] = []
    last = {name: policy.lrs[0] for name, policy in policies.items()}
    val_loss = float("nan")
    for record in example_records():
        if steps is not None and record.step > steps:
            break
        val_loss = record.metrics.get("val_loss", val_loss)
        marks = []
        for name, policy in policies.items():
            lr = policy.step(record.metrics)[0]
            if name in METRIC_DRIVEN and lr < last[name]:
                changes.append(
                    f"  step {record.step:>4}  {name:<{width}} {last[name]:.5f} -> {lr:.5f}"
                    f"  (val_loss {val_loss:.4f} did not improve for "
                    f"{PATIENCE + 1} evaluations)"
                )
                marks.append(name)
            last[name] = lr
        if record.step % PRINT_EVERY == 0 or marks:
            row = f"{record.step:>5} {record.metrics['loss']:>8.4f} {val_loss:>9.4f}  "
            row += " ".join(f"{last[name]:>{width}.5f}" for name in policies)
            print(row + ("   <- " + ", ".join(marks) + " cut" if marks else ""))
    print("\nLR changes made by the metric-driven policies:")
    print("\n".join(changes) if changes else "  none")
    print(
        "\nEvery value above is what `lrpilot simulate` prints for the same stream; "
        "see docs/policies.md for each policy."
    )
