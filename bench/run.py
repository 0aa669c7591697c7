"""Run every lrpilot benchmark and print one table of ratios against baselines
measured in the same run. ``bash scripts/bench`` runs this with the venv's
python; see bench/README.md for what each row measures.

    .venv/bin/python bench/run.py [--quick] [--json PATH] [--profile DIR] [--strict]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness


def progress(message: str) -> None:
    sys.stderr.write(f"bench: {message}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (~4x faster, noisier)")
    parser.add_argument("--json", metavar="PATH", help="also write every row and detail as JSON")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="every daemon process writes a cProfile of its loop to DIR (slows the daemon: "
        "the numbers of that run are not the daemon's)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.profile:
        harness.PROFILE_DIR = Path(args.profile).resolve()
    scale = 0.25 if args.quick else 1.0

    if importlib.util.find_spec("tensorboard") is None:
        sys.stderr.write(
            "bench: the tensorboard package is missing (SummaryWriter.add_scalar is one of "
            "the baselines): `bash scripts/bench` installs it, or "
            ".venv/bin/python -m pip install 'tensorboard>=2.14,<3'\n"
        )
        return 2
    import encoding
    import ingest
    import latency
    import memory
    import scrape
    import step_cost

    env = harness.environment()
    progress(f"environment {env}")
    started = time.monotonic()
    sections: list[tuple[str, list[harness.Row]]] = []
    details: dict = {"environment": env}

    progress("pilot.step() cost against a raw send, add_scalar and ReduceLROnPlateau ...")
    step_sections, details["step_cost"] = step_cost.measure(
        rounds=6, n=int(12_500 * scale), n_scalar=int(150 * scale), n_khz=int(150 * scale)
    )
    sections += step_sections

    progress("daemon ingest against raw PUSH/PULL ...")
    rows, details["ingest"] = ingest.measure(
        records=int(60_000 * scale), messages=int(300_000 * scale)
    )
    sections.append(("throughput, two processes on loopback", rows))

    progress("decision latency (1 kHz loop) and sync step against a raw round trip ...")
    rows, details["latency"] = latency.measure(seconds=10.0 * scale, sync_steps=int(4000 * scale))
    sections.append(("latency", rows))

    progress("scraping /metrics with 1,000 runs of 4 groups against an empty daemon ...")
    rows, details["scrape"] = scrape.measure(rounds=max(5, int(20 * scale)))
    sections.append(("Prometheus scrape (bench/scrape.py)", rows))

    progress("the daemon's memory per ended run and per active rank, the store's bytes ...")
    rows, details["memory"] = memory.measure(
        ended=int(1000 * scale), ranks=int(512 * scale), records=int(200_000 * scale)
    )
    sections.append(("memory (bench/memory.py)", rows))

    progress("encodings ...")
    rows, details["encoding"] = encoding.measure()
    sections.append(("encoding a batch of 8-metric records, per record (bench/encoding.py)", rows))

    elapsed = time.monotonic() - started
    print(
        f"lrpilot bench: lrpilot {env['git']} ({env['lrpilot_from']}), python {env['python']}, "
        f"{env['cpus']} CPUs, pyzmq {env['pyzmq']} (libzmq {env['libzmq']}), "
        f"torch {env['torch']}; {elapsed:.0f} s"
    )
    print(harness.table(sections))
    print()
    print(notes(details))
    judged = [row for _, rows in sections for row in rows if row.passed is not None]
    missed = [row for row in judged if not row.passed]
    print(f"\n{len(judged) - len(missed)} of {len(judged)} targets met.")

    if args.json:
        out = {
            "sections": [
                {"title": title, "rows": [row.as_dict() for row in rows]}
                for title, rows in sections
            ],
            "details": details,
            "seconds": elapsed,
        }
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        progress(f"wrote {args.json}")
    return 1 if (args.strict and missed) else 0


def notes(details: dict) -> str:
    """The numbers behind the table that explain a miss."""
    step, lat, ing = details["step_cost"], details["latency"], details["ingest"]
    scr = details["scrape"]
    lines = ["notes:"]
    for cadence in ("fast", "1khz"):
        added = {
            name.split("/", 1)[1]: value
            for name, value in step["added_mean_ns"].items()
            if name.startswith(cadence + "/")
        }
        lines.append(
            f"  mean added per iteration ({cadence}; includes the pilot's batched I/O): "
            + ", ".join(
                f"{name.removeprefix('pilot_')} {value / 1e3:.1f} µs"
                for name, value in added.items()
                if name.startswith("pilot_")
            )
            + f"; raw send {added['send'] / 1e3:.1f} µs"
        )
    down = step["pilot_stats"]["down_step"]
    lines.append(
        f"  daemon down: {down['records_sent']} records went into the socket's pipe "
        f"(then full), {down['records_dropped']} dropped"
    )
    lines.append(
        f"  daemon ingest bursts: {', '.join(f'{r / 1e3:.0f}k' for r in ing['rates'])} records/s"
    )
    lines.append(
        f"  decisions: {lat['decisions']}, all applied; "
        f"{lat['commands_late']} acked late (after their effective step); "
        f"pilot.step() calls after report() until the new LR was in the group "
        f"(calls: decisions): {lat['step_calls_until_new_lr']}"
    )
    lines.append(f"  1 kHz loop iterations that began > 0.5 ms late: {lat['late_loop_iterations']}")
    lines.append(
        f"  scrape: {scr['full_bytes'] / 1e6:.1f} MB of text for {scr['runs']} runs "
        f"({scr['empty_bytes'] / 1e3:.1f} kB empty); {scr['scrapes_during_round_trips']} "
        f"back-to-back scrapes during the round trips"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
