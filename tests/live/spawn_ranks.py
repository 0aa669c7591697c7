"""Two processes from torch.multiprocessing.spawn with torch.distributed
initialised (gloo) and no $RANK or $WORLD_SIZE: each attaches and prints the
rank and world size lrpilot found, as JSON lines on stdout."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lrpilot


def worker(index: int, port: int, daemon: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=index, world_size=2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    pilot = lrpilot.attach(optimizer, run="spawned", daemon=daemon)
    print(
        json.dumps({"index": index, "rank": pilot.rank, "world_size": pilot.world_size}), flush=True
    )
    pilot.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
