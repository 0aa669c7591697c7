"""Metrics batch encodings, measured: JSON against the binary packing that
lrpilot.protocol uses (a JSON header, then per record an int64 step and one
float64 per metric), per record, encode and decode.

    .venv/bin/python bench/encoding.py          # or as part of bench/run.py

The records are what the hook queues: (seq, step, kind, {8 metrics}) with
full-precision floats (a loss is never a round number). Each batch carries
the same envelope fields the hook sends (run, rank, first_seq, stats). Three
encodings of the same batch:

- ``json, dict per record``: the obvious JSON message, ``records`` a list of
  ``[step, kind, {name: value}]``; ``json.dumps`` / ``json.loads``;
- ``json, names once``: JSON with the metric names listed once and each
  record ``[step, kind, [values]]``; decode includes rebuilding the dicts;
- ``binary``: :class:`lrpilot.protocol.BatchEncoder` to encode; to decode,
  :func:`lrpilot.protocol.decode` (pydantic validation of the header) then
  :func:`lrpilot.protocol.decode_records` (the dicts).

The JSON decodes are not validated; the binary one is (the header by
pydantic, the body's length against the header), so the comparison favours
JSON. Times are the minimum over repeats (timeit's rule), per record, for a
batch of 256 records (what an async pilot sends) and of 1 record (what a sync
pilot sends every step).
"""

from __future__ import annotations

import json
import random
import sys
import timeit
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Row, table

from lrpilot.protocol import (
    PROTOCOL_VERSION,
    STEP,
    BatchEncoder,
    ClientStats,
    decode,
    decode_records,
)

NAMES = ("loss", "acc", "grad_norm", "lr", "tokens", "m5", "m6", "m7")
RUN = "bench-encoding"


def make_records(count: int, seed: int = 7) -> list[tuple[int, int, str, dict[str, float]]]:
    rng = random.Random(seed)
    return [
        (1000 + i, 1000 + i, STEP, {name: rng.random() * 10 for name in NAMES})
        for i in range(count)
    ]


def envelope(records: list, stats: dict) -> dict:
    return {"v": PROTOCOL_VERSION, "t": "metrics", "run": RUN, "rank": 0,
            "first_seq": records[0][0], "stats": stats}  # fmt: skip


def json_dict_encode(records: list, stats: dict) -> bytes:
    message = envelope(records, stats)
    message["records"] = [[step, kind, metrics] for _, step, kind, metrics in records]
    return json.dumps(message, separators=(",", ":")).encode()


def json_dict_decode(data: bytes) -> list:
    return [tuple(r) for r in json.loads(data)["records"]]


def json_names_encode(records: list, stats: dict) -> bytes:
    message = envelope(records, stats)
    message["names"] = list(records[0][3])
    message["records"] = [[step, kind, list(m.values())] for _, step, kind, m in records]
    return json.dumps(message, separators=(",", ":")).encode()


def json_names_decode(data: bytes) -> list:
    message = json.loads(data)
    names = message["names"]
    return [(step, kind, dict(zip(names, values))) for step, kind, values in message["records"]]


def binary_decode(frames: list[bytes]) -> list:
    return list(decode_records(decode(frames), frames[1]))


def per_record_ns(func: Callable[..., object], args: tuple, records: int, budget_s: float) -> float:
    """Min over repeats of one ``func(*args)``, in ns per record."""
    timer = timeit.Timer(lambda: func(*args))
    number = max(1, int(budget_s / 5 / max(timer.timeit(1), 1e-7)))
    return min(timer.repeat(repeat=5, number=number)) / number / records * 1e9


def measure(budget_s: float = 0.1) -> tuple[list[Row], dict]:
    rows: list[Row] = []
    detail: dict = {}
    stats = asdict(ClientStats())
    for size in (256, 1):
        records = make_records(size)
        expected = [(step, kind, metrics) for _, step, kind, metrics in records]
        encoder = BatchEncoder(RUN, 0)
        frames = encoder.encode(records, stats)
        dict_json = json_dict_encode(records, stats)
        names_json = json_names_encode(records, stats)
        for name, decoded in (
            ("json, dict per record", json_dict_decode(dict_json)),
            ("json, names once", json_names_decode(names_json)),
            ("binary", binary_decode(frames)),
        ):
            if [tuple(r) for r in decoded] != expected:
                raise RuntimeError(f"bench: {name} does not round-trip")
        enc = {
            "json, dict per record": per_record_ns(
                json_dict_encode, (records, stats), size, budget_s
            ),
            "json, names once": per_record_ns(json_names_encode, (records, stats), size, budget_s),
            "binary (BatchEncoder)": per_record_ns(
                encoder.encode, (records, stats), size, budget_s
            ),
        }
        dec = {
            "json, dict per record": per_record_ns(json_dict_decode, (dict_json,), size, budget_s),
            "json, names once": per_record_ns(json_names_decode, (names_json,), size, budget_s),
            "binary (decode+decode_records)": per_record_ns(
                binary_decode, (frames,), size, budget_s
            ),
            "  of which the pydantic header check": per_record_ns(
                decode, (frames,), size, budget_s
            ),
        }
        sizes = {
            "json, dict per record": len(dict_json) / size,
            "json, names once": len(names_json) / size,
            "binary": sum(len(f) for f in frames) / size,
        }
        base_enc, base_dec = enc["json, dict per record"], dec["json, dict per record"]
        batch = f"{size}-record batch"
        for label, value in enc.items():
            rows.append(Row(f"{batch}, encode: {label}", value, "ns", base_enc, "json"))
        for label, value in dec.items():
            if label.startswith(" "):
                rows.append(Row(f"{batch}, {label.strip()}", value, "ns", base_dec, "json"))
            else:
                rows.append(Row(f"{batch}, decode: {label}", value, "ns", base_dec, "json"))
        rows.append(
            Row(
                f"{batch}, bytes per record: binary",
                sizes["binary"],
                "B",
                sizes["json, dict per record"],
                "json",
            )
        )
        detail[f"batch_{size}"] = {"encode_ns": enc, "decode_ns": dec, "bytes": sizes}
    return rows, detail


if __name__ == "__main__":
    print(table([("encoding", measure()[0])]))
