"""Draw one plot per policy kind into docs/img/, by running `lrpilot simulate`.

    .venv/bin/python docs/make_policy_plots.py

For each example below it writes the policy JSON to a file, replays a
generated metric stream (one record a step) through the real ``lrpilot
simulate`` command found next to this Python, and plots the LRs it prints
(and the momentum, for the kinds that cycle it; and the watched metric, for
the plateau examples). The metric streams are synthetic and seeded, and the
PNGs carry no version metadata, so re-running it rewrites the same files.

The policies here are the JSON examples shown in docs/policies.md
(tests/test_docs.py imports EXAMPLES to check that they agree; matplotlib is
imported only when drawing).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
IMG = DOCS / "img"
LRPILOT = Path(sys.executable).parent / "lrpilot"

WIDTH_PX, HEIGHT_PX, DPI = 640, 300, 100
LR_COLOR, SECOND_COLOR = "tab:blue", "tab:orange"
HEADROOM = 1.3  # y-axis top as a multiple of the highest value, to fit the legend


def plateau_loss(steps: int, seed: int = 0) -> list[float]:
    """A validation loss that falls fast, then flattens out around 0.3 with
    noise: the shape that makes ReduceLROnPlateau cut the LR again and again.
    The stream does not react to the LR (it is replayed, not trained)."""
    rng = random.Random(seed)
    return [
        round(0.3 + 0.9 * math.exp(-t / 12) + rng.gauss(0.0, 0.012), 6) for t in range(1, steps + 1)
    ]


def guard_loss(steps: int, seed: int = 0) -> list[float]:
    """A noisy decaying training loss with a spike (5x) at step 60 and a NaN at
    step 110: what a guard trips on."""
    rng = random.Random(seed)
    values = [
        round(0.4 + 2.0 * math.exp(-t / 40) + rng.gauss(0.0, 0.02), 6) for t in range(1, steps + 1)
    ]
    values[60 - 1] = round(5 * values[60 - 1], 6)
    values[110 - 1] = math.nan
    return values


def range_test_loss(policy: dict[str, Any], steps: int, seed: int = 0) -> list[float]:
    """A loss as a range test sees it: flat while the LR is too small to learn,
    falling as it grows, blowing up past about 0.05. It follows the LR the
    range test's sweep runs each step at (lrpilot's own policy, stepped here
    on the stream as it is made, says when the sweep ends); from then on it is
    the loss of a fit that starts again (the sweep's updates undone) and
    decays."""
    from lrpilot.policies import parse_policy

    rng = random.Random(seed)
    sweep = parse_policy(policy).build([0.1])
    values: list[float] = []
    ended = 0
    for t in range(1, steps + 1):
        if not ended:
            x = math.log10(sweep.lrs[0])  # the LR this step runs at
            value = 2.3 - 1.8 / (1 + math.exp(-3 * (x + 2.2))) + math.exp(8 * (x + 1.2))
            values.append(round(value + rng.gauss(0.0, 0.02), 6))
            sweep.step({"loss": values[-1]})
            ended = t if sweep.phase == "done" else 0
        else:
            decay = 0.3 + 2.0 * math.exp(-(t - ended) / 25)
            values.append(round(decay + rng.gauss(0.0, 0.02), 6))
    return values


def smooth_loss(steps: int) -> list[float]:
    """A plain decaying loss; the step-driven kinds ignore it."""
    return [round(0.2 + 2.0 * math.exp(-t / 40), 6) for t in range(1, steps + 1)]


@dataclass(frozen=True)
class Example:
    name: str  # docs/img/policy-<name>.png
    title: str
    policy: dict[str, Any]
    steps: int
    base_lrs: tuple[float, ...] = (0.1,)
    metric: str = "loss"
    plateau_stream: bool = False  # the noisy plateauing loss, plotted beside the LR
    guard_stream: bool = False  # the loss with a spike and a NaN, plotted beside the LR
    range_stream: bool = False  # a loss that reacts to a range test's LR, plotted (log) beside it
    marks: tuple[int, ...] = field(default=())  # steps to mark with a dotted line
    log_lr: bool = False
    stairs: bool = False  # draw the LR as a staircase (a cut shows at the step it happens)


EXAMPLES: tuple[Example, ...] = (
    Example(
        "plateau",
        "plateau: halve the LR once val_loss has not improved by 1% for 6 records",
        {
            "kind": "plateau",
            "metric": "val_loss",
            "factor": 0.5,
            "patience": 5,
            "threshold": 0.01,
            "cooldown": 3,
            "min_lr": 0.005,
        },
        steps=160,
        metric="val_loss",
        plateau_stream=True,
        stairs=True,
    ),
    Example(
        "cyclic",
        "cyclic: triangular2, step_size_up=20 (momentum moves inversely)",
        {
            "kind": "cyclic",
            "base_lr": 0.001,
            "max_lr": 0.1,
            "step_size_up": 20,
            "mode": "triangular2",
        },
        steps=160,
    ),
    Example(
        "cosine_restarts",
        "cosine_restarts: T_0=20, T_mult=2 (restarts at 20, 60, 140)",
        {"kind": "cosine_restarts", "T_0": 20, "T_mult": 2, "eta_min": 0.001},
        steps=160,
        marks=(20, 60, 140),
    ),
    Example(
        "cosine",
        "cosine: T_max=100, run past T_max (it climbs back up)",
        {"kind": "cosine", "T_max": 100, "eta_min": 0.001},
        steps=140,
        marks=(100,),
    ),
    Example(
        "step",
        "step: gamma=0.5 every 30 steps",
        {"kind": "step", "step_size": 30, "gamma": 0.5},
        steps=160,
        stairs=True,
    ),
    Example(
        "multistep",
        "multistep: gamma=0.5 at steps 50, 100 and 130",
        {"kind": "multistep", "milestones": [50, 100, 130], "gamma": 0.5},
        steps=160,
        stairs=True,
    ),
    Example(
        "exponential",
        "exponential: gamma=0.97 every step",
        {"kind": "exponential", "gamma": 0.97},
        steps=160,
    ),
    Example(
        "linear",
        "linear: warm up from 0.1x to 1x the base LR over 50 steps",
        {"kind": "linear", "start_factor": 0.1, "end_factor": 1.0, "total_iters": 50},
        steps=160,
        marks=(50,),
    ),
    Example(
        "onecycle",
        "onecycle: max_lr=0.1, total_steps=160 (momentum moves inversely)",
        {"kind": "onecycle", "max_lr": 0.1, "total_steps": 160},
        steps=160,
    ),
    Example(
        "sequential",
        "sequential: linear warmup for 30 steps, then cosine",
        {
            "kind": "sequential",
            "policies": [
                {"kind": "linear", "start_factor": 0.01, "total_iters": 30},
                {"kind": "cosine", "T_max": 130, "eta_min": 0.001},
            ],
            "milestones": [30],
        },
        steps=160,
        marks=(30,),
    ),
    Example(
        "sequential-plateau",
        "sequential: linear warmup for 20 steps, then plateau on val_loss (no min_lr)",
        {
            "kind": "sequential",
            "policies": [
                {"kind": "linear", "start_factor": 0.01, "total_iters": 20},
                {
                    "kind": "plateau",
                    "metric": "val_loss",
                    "factor": 0.5,
                    "patience": 5,
                    "threshold": 0.01,
                    "cooldown": 3,
                },
            ],
            "milestones": [20],
        },
        steps=160,
        metric="val_loss",
        plateau_stream=True,
        marks=(20,),
        stairs=True,
    ),
    Example(
        "guard",
        "guard over cosine: a loss spike (step 60), a NaN (step 110): LR x0.1 for 20 steps",
        {
            "kind": "guard",
            "inner": {"kind": "cosine", "T_max": 160, "eta_min": 0.001},
            "hold": 20,
            "factor": 3.0,
        },
        steps=160,
        guard_stream=True,
        marks=(60, 110),
        stairs=True,
    ),
    Example(
        "range_test",
        "range_test: sweep 1e-5 to 1 until the loss blows up, then cosine from the suggestion",
        {
            "kind": "range_test",
            "min_lr": 1e-05,
            "max_lr": 1.0,
            "steps": 100,
            "then": {"kind": "cosine", "T_max": 100},
        },
        steps=160,
        range_stream=True,
        marks=(86,),
        log_lr=True,
    ),
)


def metric_stream(example: Example) -> list[float]:
    if example.plateau_stream:
        return plateau_loss(example.steps)
    if example.guard_stream:
        return guard_loss(example.steps)
    if example.range_stream:
        return range_test_loss(example.policy, example.steps)
    return smooth_loss(example.steps)


def simulate(example: Example, workdir: Path) -> list[dict[str, Any]]:
    """Run ``lrpilot simulate`` on the example; return its output lines."""
    policy_path = workdir / f"{example.name}.json"
    policy_path.write_text(json.dumps(example.policy, indent=2) + "\n")
    stream = "".join(
        json.dumps({"step": step, "metrics": {example.metric: value}}) + "\n"
        for step, value in enumerate(metric_stream(example), start=1)
    )
    command = [str(LRPILOT), "simulate", "--policy", str(policy_path)]
    for lr in example.base_lrs:
        command += ["--base-lr", repr(lr)]
    result = subprocess.run(command, input=stream, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"{example.name}: lrpilot simulate exited {result.returncode}: {result.stderr.strip()}"
        )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    if len(lines) != example.steps:
        raise SystemExit(f"{example.name}: expected {example.steps} output lines, got {len(lines)}")
    return lines


def leave_headroom(axis: Any, values: list[float]) -> None:
    values = [v for v in values if math.isfinite(v)]  # a NaN in the stream is a gap
    low, high = min(values), max(values)
    pad = (high - low) or abs(high) or 1.0
    axis.set_ylim(low - 0.05 * pad, high + (HEADROOM - 1) * pad * 1.2)


def plot(example: Example, lines: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [line["step"] for line in lines]
    n_groups = len(lines[0]["lrs"])
    fig, ax = plt.subplots(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    handles = []
    for g in range(n_groups):
        label = "learning rate" if n_groups == 1 else f"LR, group {g}"
        (h,) = ax.plot(
            steps,
            [line["lrs"][g] for line in lines],
            color=LR_COLOR,
            label=label,
            drawstyle="steps-post" if example.stairs else "default",
        )
        handles.append(h)
    ax.set_xlabel("scheduler step (input record)")
    ax.set_ylabel("learning rate", color=LR_COLOR)
    ax.set_xlim(0, steps[-1])
    top = max(max(line["lrs"]) for line in lines)
    if example.log_lr:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, top * HEADROOM)  # room for the legend above the curves
    ax.grid(alpha=0.3)
    for mark in example.marks:
        ax.axvline(mark, color="gray", linestyle=":", linewidth=1)

    second = None
    if "momenta" in lines[0]:
        second = ax.twinx()
        (h,) = second.plot(
            steps,
            [line["momenta"][0] for line in lines],
            color=SECOND_COLOR,
            linestyle="--",
            label="momentum",
        )
        second.set_ylabel("momentum", color=SECOND_COLOR)
        leave_headroom(second, [line["momenta"][0] for line in lines])
        handles.append(h)
    elif example.plateau_stream or example.guard_stream or example.range_stream:
        second = ax.twinx()
        (h,) = second.plot(
            steps,
            metric_stream(example),
            color=SECOND_COLOR,
            linewidth=0.8,
            alpha=0.8,
            label=example.metric,
        )
        second.set_ylabel(example.metric, color=SECOND_COLOR)
        if example.range_stream:  # the blow-up is orders of magnitude
            second.set_yscale("log")
            values = metric_stream(example)
            second.set_ylim(min(values) / 1.5, max(values) * 30)
        else:
            leave_headroom(second, metric_stream(example))
        handles.append(h)
    ax.set_zorder(1 if second is not None else 0)  # the LR line above the second curve
    ax.patch.set_visible(False)

    ax.set_title(example.title, fontsize=10)
    ax.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8, framealpha=0.9)
    fig.tight_layout()
    # No "Software" metadata: the PNG bytes then do not depend on the version.
    fig.savefig(out, dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=IMG, help="folder for the PNGs (docs/img)")
    args = parser.parse_args(argv)
    if not LRPILOT.exists():
        raise SystemExit(f"{LRPILOT} not found: install lrpilot into this Python's environment")
    import matplotlib

    matplotlib.rcParams.update({"font.size": 9, "svg.hashsalt": "lrpilot"})
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for example in EXAMPLES:
            out = args.out / f"policy-{example.name}.png"
            plot(example, simulate(example, Path(tmp)), out)
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
