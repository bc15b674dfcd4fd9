"""Data parallel on CPU (gloo): two processes, as ``torchrun --nproc_per_node=2`` would start them.

Each rank trains on its own shard with its own sampler generator (seed + rank) and dropout stream;
gradients and VCAS's variance statistics are averaged over ranks. So after several variance phases both
ranks must hold *identical* s, rho, nu and phase statistics, different generator states, and identical
parameters (gradients differ per shard, so without the all-reduce the weights would drift apart).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, config: dict, out_dir: str) -> None:
    """One rank: torchrun's environment, one thread, ``run(cfg)``; saves what the rank ended with."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import vcas_bench.train.run as run_module

    train = run_module.train

    def train_and_keep(state, *args, **kwargs):
        result = train(state, *args, **kwargs)
        torch.save({"model": state.model.state_dict(), "sampler": state.sampler.state_dict(),
                    "steps": result.steps}, Path(out_dir) / f"rank{rank}.pt")
        return result

    run_module.train = train_and_keep
    run_module.run(OmegaConf.create(config), Path(out_dir))


DDP = ["task=digits", "model=vit-tiny", "sampler=vcas", "baselines=[]", "sampler.F=2", "sampler.tau=0.5",
       "sampler.alpha=0.1", "trainer.max_steps=8", "task.batch_size=16", "task.args.train_size=256",
       "task.args.eval_size=64", "trainer.num_threads=1", "trainer.checkpoint_every=4",
       "trainer.flops_every=0"]


def _spawn(cfg, out_dir: Path) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)  # rank 1 may save before rank 0 wrote anything there
    mp.spawn(_rank_main, args=(_free_port(), OmegaConf.to_container(cfg), str(out_dir)), nprocs=WORLD)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_two_gloo_ranks_decide_alike_and_end_with_equal_weights(make_cfg, tmp_path):
    """8 steps, 4 phases; then the same run stopped after 4 steps and resumed on two fresh ranks ends
    identical to it on each rank (every rank restored its own generator, RNG and data position)."""
    ranks = _spawn(make_cfg(*DDP, f"output_dir={tmp_path}"), tmp_path)
    assert ranks[0]["steps"] == ranks[1]["steps"] == 8
    history = [r["sampler"]["history"] for r in ranks]
    assert len(history[0]) == 4 and history[0] == history[1]  # s, rho, nu, V_s, V_act, V_w per phase
    last = history[0][-1]
    assert last["s"] < 1 and min(last["rho"]) < 1 and min(last["nu"]) < 1  # the controller did move
    assert not torch.equal(ranks[0]["sampler"]["generator"], ranks[1]["sampler"]["generator"])
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    # Only rank 0 writes; its checkpoint holds both ranks' RNG, sampler and data positions.
    assert (tmp_path / "vcas" / "metrics.json").exists()
    checkpoint = torch.load(sorted((tmp_path / "vcas" / "checkpoints").glob("step_*.pt"))[-1],
                            weights_only=True)
    assert len(checkpoint["ranks"]) == WORLD
    assert checkpoint["ranks"][1]["sampler"]["history"] == history[1]

    parts = tmp_path / "parts"
    _spawn(make_cfg(*DDP, f"output_dir={parts}", "trainer.stop_after=4"), parts)
    resumed = _spawn(make_cfg(*DDP, f"output_dir={parts}", "trainer.resume=auto"), parts)
    for whole, part in zip(ranks, resumed):
        assert part["sampler"]["history"] == whole["sampler"]["history"]
        assert torch.equal(part["sampler"]["generator"], whole["sampler"]["generator"])
        for key, value in whole["model"].items():
            assert torch.equal(part["model"][key], value), key
