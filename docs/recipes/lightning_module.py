"""Recipe: VCAS in Lightning, with accumulation, checkpoints and resume (docs/integrations.md)."""

import lightning as L
import torch

from vcas_bench.integrations.lightning import VcasCallback  # + VCAS
from vcas_bench.vcas import VcasConfig  # + VCAS


class Classifier(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def train(model, loader, output_dir, steps, ckpt_path=None):
    vcas = VcasCallback(VcasConfig(F=2))  # + VCAS
    trainer = L.Trainer(
        max_steps=steps, accumulate_grad_batches=2, accelerator="cpu", default_root_dir=output_dir,
        callbacks=[vcas, L.pytorch.callbacks.ModelCheckpoint(dirpath=output_dir, save_top_k=-1)],  # + vcas
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Classifier(model), loader, ckpt_path=ckpt_path)
    return vcas
