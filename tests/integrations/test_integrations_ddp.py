"""The DDP recipe (docs/recipes/ddp_loop.py) on two CPU processes (gloo), as torchrun would start them.

Each rank trains its own shard and draws its own samples (seed + rank); ``reduce_fn=ddp_mean`` averages
the variance estimates and a folded gradient is averaged before it enters ``.grad`` (no DDP forward
syncs it). So after the run both ranks hold the same schedule (s, rho, nu, every phase's V_s), different
generator states, and identical parameters."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from integration_helpers import TokenRows, recipe, schedule, tiny_bert

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tiny_bert()
        vcas = recipe("ddp_loop").train(model, TokenRows(128), steps=4)
        ctl = vcas.controller
        torch.save(
            {
                "schedule": schedule(ctl),
                "generator": ctl.generator.get_state(),
                "phases": ctl.phases,
                "model": model.state_dict(),
                "ratio": ctl.analytic_flops_ratio(),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_recipe_keeps_ranks_in_step(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["phases"] >= 2
    assert r0["schedule"] == r1["schedule"]
    assert r0["ratio"] == r1["ratio"]
    assert not torch.equal(r0["generator"], r1["generator"])
    for key, value in r0["model"].items():
        torch.testing.assert_close(r1["model"][key], value, rtol=0, atol=0)
