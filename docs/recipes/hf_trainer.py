"""Recipe: VCAS in HF transformers.Trainer, with accumulation, checkpoints, resume (docs/integrations.md)."""

from transformers import TrainingArguments

from vcas_bench.integrations.hf import VcasTrainer  # + VCAS (was: from transformers import Trainer)
from vcas_bench.vcas import VcasConfig  # + VCAS


def train(model, train_dataset, output_dir, steps, save_steps, resume=False):
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=1e-3, save_steps=save_steps, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    # + VCAS: VcasTrainer instead of Trainer, with a vcas_config
    vcas_config = VcasConfig.plus(F=2)
    trainer = VcasTrainer(model=model, args=args, train_dataset=train_dataset, vcas_config=vcas_config)
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer
