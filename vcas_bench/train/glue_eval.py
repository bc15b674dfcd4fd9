"""The GLUE evaluation of a pretrained masked-LM (VCAS paper, Table 1: BERT pretraining is scored by GLUE).

After a pretraining run, ``task.glue_eval`` (optional) fine-tunes a classifier that starts from the
pretrained encoder on one GLUE task for a fixed number of exact steps and reports its dev accuracy:

    vcas-bench task=c4 model=bert-base task.args.data_dir=/data/c4 \
        task.glue_eval.task=sst2 task.glue_eval.steps=2000 task.glue_eval.data_dir=/data/glue/SST-2

Each sampler's pretrained encoder gets the same fine-tuning (exact backprop, same seed, data order and
head init), so the accuracies compare the encoders. The paper averages over GLUE tasks with its own
fine-tuning budget, neither stated; one task per run keeps this cheap (sweep ``task.glue_eval.task``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from vcas_bench.config import GlueEvalConfig
from vcas_bench.measure.flops import FlopMeter
from vcas_bench.measure.timers import UnitTimer
from vcas_bench.models import ModelBundle
from vcas_bench.models.bert import classifier_from_mlm
from vcas_bench.samplers import create_sampler
from vcas_bench.tasks import create_task
from vcas_bench.tasks.glue import SPECS
from vcas_bench.train import build
from vcas_bench.train.data import build_extra_stream, build_train_stream
from vcas_bench.train.loop import LoopOptions, train
from vcas_bench.train.state import LoopResult, TrainState

__all__ = ["glue_eval"]


def glue_eval(pretrained: ModelBundle, cfg: GlueEvalConfig, seed: int, device: torch.device
              ) -> dict[str, Any]:
    """Fine-tune a classifier on the pretrained encoder, exact backprop; return ``glue_<task>_*`` metrics.

    The pretrained model is left as it is (the classifier holds copies of its weights). Head init and
    dropout draw from the global RNG re-seeded with ``seed`` inside ``fork_rng``, so every sampler's
    encoder is fine-tuned under the same randomness and the caller's RNG stream is untouched.
    """
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        bundle = classifier_from_mlm(pretrained, SPECS[cfg.task].num_labels)
        data = create_task(cfg.task, bundle, seed=seed, max_length=cfg.max_length, data_dir=cfg.data_dir,
                           train_size=cfg.train_size, eval_size=cfg.eval_size)
        sampler = create_sampler("exact", seed=seed)
        sampler.attach(bundle.model, bundle.block_type, cfg.steps)
        optimizer = build.build_optimizer(bundle.model, "adamw", cfg.lr, cfg.weight_decay, momentum=0.0)
        scheduler = build.build_scheduler(optimizer, "linear", cfg.steps, cfg.warmup_ratio)
        loaders = {"": DataLoader(data.eval, batch_size=cfg.batch_size)}
        loaders.update({f"{name}_": DataLoader(ds, batch_size=cfg.batch_size)
                        for name, ds in data.extra_eval.items()})
        state = TrainState(
            model=bundle.model, sampler=sampler, optimizer=optimizer, scheduler=scheduler,
            batches=build_train_stream(data.train, cfg.batch_size, seed),
            extra=build_extra_stream(data.train, cfg.batch_size, seed),
            result=LoopResult(timer=UnitTimer(device), flops=FlopMeter(0)),
        )
        result = train(state, build.build_loss_fn(bundle, device),
                       evaluate=lambda: build.evaluate_all(bundle, loaders, device),
                       options=LoopOptions(total_steps=cfg.steps, flops_every=0, progress=False))
    final = result.evals[-1]
    metrics = {f"glue_{cfg.task}_{key.removeprefix('eval_')}": value
               for key, value in final.items() if key.startswith("eval_")}
    losses = [row["loss"] for row in result.train_log]
    metrics["glue_accuracy"] = metrics[f"glue_{cfg.task}_accuracy"]  # the comparison table's column
    return {**metrics, f"glue_{cfg.task}_train_loss": sum(losses[-10:]) / len(losses[-10:]),
            f"glue_{cfg.task}_steps": result.steps}
