"""``lrpilot demo``: a daemon and a real training run under its control.

Starts ``lrpilot daemon`` as a child process on a free loopback port, trains
a small MLP on scikit-learn's bundled digits with ``lrpilot.attach`` (linear
warmup, then reduce-on-plateau on the validation loss, under a guard that
cuts the LR when the loss spikes), prints progress and every LR change with
its reason as it lands, then trains the same model with a constant LR and
compares the two.

Both trainings meet one corrupted batch (labels shifted, inputs x10) at 60 %
of the steps. Under lrpilot the guard trips on its loss; the loop sees
``pilot.tripped`` and reloads the model it kept at the last evaluation,
which is what a training script does with the flag (lrpilot itself never
touches the model). The constant-LR training takes the hit.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

BASE_LR = 0.2
BATCH = 32
EVAL_EVERY = 25
DEFAULT_STEPS = 1500
DEFAULT_POLICY: dict[str, Any] = {
    "kind": "guard",
    # A wide factor: this MLP's training loss falls near 0, where one
    # batch's loss is often 20x the window's mean; a corrupted batch's is
    # thousands of times it.
    "metric": "loss",
    "spike": "ratio",
    "factor": 100.0,
    "window": 100,
    "cut": 0.1,
    "hold": 50,
    "inner": {
        "kind": "sequential",
        "policies": [
            {"kind": "linear", "start_factor": 0.1, "total_iters": 100},
            {
                "kind": "plateau",
                "metric": "val_loss",
                "patience": 4,
                "factor": 0.5,
                "min_lr": 0.002,
            },
        ],
        "milestones": [100],
    },
}
SPIKE_AT = 0.6  # of the steps: where the corrupted batch comes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(address: str, state_dir: str, metrics: str) -> subprocess.Popen:
    """The demo's own daemon: free ports and a throwaway store, so it never
    meets a daemon the user runs."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrpilot.daemon.cli.main",
            "daemon",
            "--address",
            address,
            "--control-address",
            f"tcp://127.0.0.1:{free_port()}",
            "--state-dir",
            state_dir,
            "--metrics-addr",
            metrics,
            "--log-level",
            "warning",
        ],
    )


# The lines of /metrics the demo shows: what a dashboard plots.
SHOWN_METRICS = (
    "lrpilot_run_step",
    "lrpilot_run_metric",
    "lrpilot_group_lr",
    "lrpilot_run_lr_changes_total",
    "lrpilot_policy_plateau_best",
    "lrpilot_policy_plateau_bad_steps",
    "lrpilot_policy_guard_trips_total",
    "lrpilot_records_ingested_total",
)


def prometheus_view(url: str) -> list[str]:
    """The daemon's /metrics lines for the demo run (a daemon that cannot be
    scraped is said so: the demo is about the training)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        return [f"(could not scrape: {exc})"]
    return [line for line in text.splitlines() if line.split("{")[0].split(" ")[0] in SHOWN_METRICS]


class Digits:
    """scikit-learn's bundled digits as tensors, split train/validation."""

    def __init__(self) -> None:
        import torch
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        self.x_train, self.y_train = x[:1400], y[:1400]
        self.x_val, self.y_val = x[1400:], y[1400:]


def train(
    data: Digits, steps: int, pilot_args: Mapping[str, Any] | None, quiet: bool = False
) -> dict[str, float]:
    """Train from a fixed seed; with ``pilot_args``, under lrpilot, reloading
    the last evaluated model when the guard trips."""
    import copy

    import torch

    import lrpilot

    torch.manual_seed(0)
    # A model this small only loses from intra-op threads (measured: 10x slower
    # on 2 busy cores); one thread also keeps the two runs comparable.
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = torch.Generator().manual_seed(0)
    pilot = None
    if pilot_args is not None:
        pilot = lrpilot.attach(optimizer, **pilot_args)
    result: dict[str, float] = {"reloads": 0}
    spike_at = max(1, int(steps * SPIKE_AT))
    good = (0, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data.x_train), (BATCH,), generator=batches)
        x, y = data.x_train[idx], data.y_train[idx]
        if step == spike_at:
            x, y = x * 10, (y + 1) % 10
            if not quiet:
                print(f"  !! step {step:>5}  a corrupted batch (labels shifted, inputs x10)")
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if pilot is not None:
            pilot.step(loss=loss.detach())
            trip = pilot.tripped
            if trip is not None:
                # What a script does with the flag: here, go back to the
                # model of the last evaluation (lrpilot's LRs stay as set).
                model.load_state_dict(good[1])
                optimizer.load_state_dict(good[2])
                result["reloads"] += 1
                if not quiet:
                    print(
                        f"  !! step {step:>5}  the guard tripped ({trip.cause}, loss "
                        f"{trip.value if trip.value is not None else 'not finite'}): "
                        f"the loop reloads the model of step {good[0]}",
                        flush=True,
                    )
        if step % EVAL_EVERY == 0 or step == steps:
            with torch.no_grad():
                logits = model(data.x_val)
                val_loss = loss_fn(logits, data.y_val).item()
                accuracy = (logits.argmax(1) == data.y_val).float().mean().item()
            if pilot is not None:
                pilot.report(val_loss=val_loss, val_accuracy=accuracy)
            result.update(val_loss=val_loss, val_accuracy=accuracy)
            if pilot is None or pilot.tripped is None:
                good = (
                    step,
                    copy.deepcopy(model.state_dict()),
                    copy.deepcopy(optimizer.state_dict()),
                )
            if not quiet and (step % (EVAL_EVERY * 4) == 0 or step == steps):
                lr = optimizer.param_groups[0]["lr"]
                print(
                    f"  step {step:>5}  loss {loss.item():.4f}  val_loss {val_loss:.4f}  "
                    f"val_acc {accuracy:6.2%}  lr {lr:.5f}",
                    flush=True,
                )
    if pilot is not None:
        result["records_dropped"] = pilot.stats.records_dropped
        result["commands_applied"] = pilot.stats.commands_applied
        pilot.close()
    return result


def main(
    steps: int | None = None, policy: dict[str, Any] | None = None, sync: bool = False
) -> None:
    from lrpilot.policies import parse_policy

    steps = steps or DEFAULT_STEPS
    policy = policy or DEFAULT_POLICY
    parse_policy(policy)  # a bad --policy fails here, before anything starts
    address = f"tcp://127.0.0.1:{free_port()}"
    state_dir = tempfile.mkdtemp(prefix="lrpilot-demo-")
    metrics_addr = f"127.0.0.1:{free_port()}"
    metrics_url = f"http://{metrics_addr}/metrics"
    daemon = start_daemon(address, state_dir, metrics_addr)
    changes: list[tuple[int, float, float, str]] = []

    def on_change(step: int, old: list[float], new: list[float], reason: str, actor: str) -> None:
        changes.append((step, old[0], new[0], reason))
        print(
            f"  >> step {step:>5}  LR {old[0]:.5f} -> {new[0]:.5f}  by {actor}: {reason}",
            flush=True,
        )

    try:
        data = Digits()
        print(f"lrpilot demo: daemon (pid {daemon.pid}) on {address}")
        print(f"policy: {json.dumps(policy)}")
        print(
            f"training an MLP on scikit-learn's digits for {steps} steps "
            f"({'sync' if sync else 'async'} mode), base LR {BASE_LR}\n"
        )
        started = time.perf_counter()
        piloted = train(
            data,
            steps,
            {
                "run": "demo",
                "policy": policy,
                "daemon": address,
                "sync": sync,
                "on_change": on_change,
            },
        )
        elapsed = time.perf_counter() - started
        scraped = prometheus_view(metrics_url)
    finally:
        daemon.terminate()
        daemon.wait(10)
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"\nthe same training with a constant LR of {BASE_LR}, for comparison ...")
    constant = train(data, steps, None, quiet=True)

    print(f"\nsummary ({elapsed:.1f} s under lrpilot)")
    print(f"  LR changes decided by the daemon: {len(changes)}")
    print(f"  models reloaded after a guard trip: {int(piloted['reloads'])}")
    for step, old, new, reason in changes:
        print(f"    step {step:>5}  {old:.5f} -> {new:.5f}  {reason}")
    print(f"  {'':<22}{'val_loss':>10}{'val_accuracy':>14}")
    print(f"  {'with lrpilot':<22}{piloted['val_loss']:>10.4f}{piloted['val_accuracy']:>14.2%}")
    print(f"  {'constant LR':<22}{constant['val_loss']:>10.4f}{constant['val_accuracy']:>14.2%}")
    print(f"  telemetry records dropped: {int(piloted['records_dropped'])}")
    print(f"\nwhat Prometheus scraped from {metrics_url} at the end (docs/metrics.md):")
    for line in scraped:
        print(f"  {line}")
