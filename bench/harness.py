"""What the benchmarks share: subprocess workers, timing statistics and the
result table."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# --- workers (bench/workers.py in a subprocess) -----------------------------

# With --profile DIR, every daemon worker writes a cProfile of its serve loop there.
PROFILE_DIR: Path | None = None
_profiles = itertools.count(1)


class Worker:
    """``python bench/workers.py ROLE ARGS`` in its own process (own core, own
    GIL). ``address`` is what it bound; ``finish()`` returns its DONE payload."""

    def __init__(self, role: str, *args: str, label: str = "", timeout: float = 30.0) -> None:
        self.role = role
        if role == "daemon" and PROFILE_DIR is not None:
            PROFILE_DIR.mkdir(parents=True, exist_ok=True)
            name = f"daemon-{next(_profiles):02d}-{label or 'bench'}.prof"
            args = (*args, "--profile", str(PROFILE_DIR / name))
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "workers.py"), role, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.address = self._expect("READY")
        self._timeout = timeout

    def _expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(word + " "):
            self.proc.kill()
            raise RuntimeError(f"bench worker {self.role!r}: expected {word}, got {line!r}")
        return line[len(word) + 1 :].strip()

    def finish(self, stop: bool = True) -> dict[str, Any]:
        """SIGTERM it (unless it ends by itself) and return its DONE payload."""
        if stop and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        payload = json.loads(self._expect("DONE"))
        self.proc.wait(self._timeout)
        return payload

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def dead_address() -> str:
    """A loopback address where nothing listens (a port that was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


# --- statistics ---------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class Summary:
    """Per-call times in nanoseconds."""

    n: int
    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, samples: list[int] | list[float]) -> Summary:
        values = sorted(samples)
        return cls(
            len(values),
            percentile(values, 0.5),
            percentile(values, 0.99),
            sum(values) / len(values),
        )


# --- results ------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: ``measured`` against ``baseline`` (same unit),
    ``ratio = measured / baseline``, passing when ``ratio <= limit`` (or
    ``>= limit`` with ``at_least``). Rows without a limit are for reference."""

    quantity: str
    measured: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    limit: float | None = None
    at_least: bool = False

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.measured / self.baseline

    @property
    def passed(self) -> bool | None:
        if self.limit is None or self.ratio is None:
            return None
        return self.ratio >= self.limit if self.at_least else self.ratio <= self.limit

    @property
    def target(self) -> str:
        if self.limit is None:
            return ""
        return f"{'>=' if self.at_least else '<='} {self.limit:g}x"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ratio=self.ratio, passed=self.passed, target=self.target)
        return out


def fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "ns":
        if value >= 1e6:
            return f"{value / 1e6:.2f} ms"
        if value >= 1e3:
            return f"{value / 1e3:.2f} µs"
        return f"{value:.0f} ns"
    if unit == "/s":
        if value >= 1e6:
            return f"{value / 1e6:.2f} M/s"
        if value >= 1e3:
            return f"{value / 1e3:.1f} k/s"
        return f"{value:.0f} /s"
    return f"{value:.3g} {unit}"


def ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio >= 0.1:
        return f"{ratio:.2f}x"
    return f"{ratio:.2g}x"


def table(sections: list[tuple[str, list[Row]]]) -> str:
    """The rows of every section under one header, each section titled."""
    header = ["quantity", "measured", "baseline", "ratio", "target", "result"]
    lines: list[list[str] | str] = [header]
    for title, rows in sections:
        lines.append(title)
        for row in rows:
            baseline = fmt(row.baseline, row.unit)
            if row.baseline_name:
                baseline = f"{baseline} ({row.baseline_name})"
            result = {True: "PASS", False: "FAIL", None: ""}[row.passed]
            lines.append(
                [
                    row.quantity,
                    fmt(row.measured, row.unit),
                    baseline,
                    ratio_text(row.ratio),
                    row.target,
                    result,
                ]
            )
    cells = [line for line in lines if isinstance(line, list)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        if isinstance(line, str):
            out.append(f"[{line}]")
            continue
        out.append(" | ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if k == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def environment() -> dict[str, Any]:
    import platform

    import torch
    import zmq

    import lrpilot

    return {
        "lrpilot_from": str(Path(lrpilot.__file__).parent),
        "git": git_state(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "torch": torch.__version__,
        "lrpilot": lrpilot.__version__,
    }


def git_state() -> str:
    """The checkout's commit, ``+changes`` when client/ or daemon/ differ from
    it; ``not this checkout`` when lrpilot is imported from elsewhere."""
    import lrpilot

    root = HERE.parent
    if Path(lrpilot.__file__).resolve().parent != root / "client":
        return "not this checkout"
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "client", "daemon"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")
