"""WideResNet-18 (Zagoruyko & Komodakis, 2016; ResNet-18 layout of He et al., 2016), the CNN of the VCAS
paper's Appendix C (Table 8: ImageNet pretraining, widen factor 4, SGD with momentum 0.9, activation
sampling only).

The paper gives no more than "WRN-18, widen factor 4". We read it the usual way for basic-block
ImageNet WRNs: ResNet-18's stem (7x7/2 conv with 64 channels, 3x3/2 max-pool) and four stages of two
`BasicBlock`s whose widths are ResNet-18's times the widen factor, 64k/128k/256k/512k = 256/512/1024/2048
for k = 4 (about 180M parameters), then global average pooling and one linear classifier. The blocks
are torchvision's `BasicBlock` (conv-BN-ReLU-conv-BN plus the shortcut, then ReLU); a strided block's
shortcut is a 1x1 conv and BN, as in torchvision's ResNet.

VCAS wraps the `BasicBlock`s: SampleA at each block output, no SampleW (a block holds no `nn.Linear`;
convolutions are left as they are). BatchNorm in train mode mixes the rows of a batch; see
`vcas_bench/vcas/README.md` ("CNNs and BatchNorm") for why the sampled gradient stays unbiased and why
it saves no convolution work. `wrn18-tiny` is the same class with a few channels and a CIFAR-style stem
(3x3/1 conv, no max-pool) for small images, random init, for tests.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from vcas_bench.models.base import ModelBundle, register_model

__all__ = ["WideResNet", "wrn18", "wrn18_tiny"]

BLOCK_TYPE = "BasicBlock"


class WideResNet(nn.Module):
    """ResNet with `BasicBlock`s and widened stages.

    Args:
        layers: Blocks per stage, e.g. (2, 2, 2, 2) for the 18-layer layout.
        widths: Output channels per stage.
        num_classes: Size of the classifier.
        stem_width: Channels of the stem conv.
        small_stem: 3x3 stride-1 stem without max-pool (small images) instead of 7x7/2 plus 3x3/2 max-pool.
        in_chans: Input channels.
    """

    def __init__(
        self,
        layers: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int,
        stem_width: int = 64,
        small_stem: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if small_stem:
            conv = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
            pool = nn.Identity()
        else:
            conv = nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stem = nn.Sequential(conv, nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True), pool)
        stages, channels = [], stem_width
        for index, (depth, width) in enumerate(zip(layers, widths, strict=True)):
            stages.append(_stage(channels, width, depth, stride=1 if index == 0 else 2))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():  # torchvision's ResNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, num_classes) logits."""
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def _stage(in_channels: int, width: int, depth: int, stride: int) -> nn.Sequential:
    """`depth` BasicBlocks; the first changes width and stride, with a 1x1 conv + BN shortcut if needed."""
    shortcut = None
    if stride != 1 or in_channels != width:
        shortcut = nn.Sequential(conv1x1(in_channels, width, stride), nn.BatchNorm2d(width))
    blocks = [BasicBlock(in_channels, width, stride, shortcut)]
    blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


def image_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits (N, num_labels) for a batch with `pixel_values` (N, C, H, W)."""
    return model(batch["pixel_values"])


def _create_wrn(
    num_labels: int, widen_factor: int, base_width: int, image_size: int, num_channels: int, small_stem: bool
) -> ModelBundle:
    widths = tuple(base_width * widen_factor * 2**i for i in range(4))
    model = WideResNet((2, 2, 2, 2), widths, num_labels, base_width, small_stem, num_channels)
    return ModelBundle(
        model, BLOCK_TYPE, "image", image_logits, image_size=image_size, num_channels=num_channels
    )


@register_model("wrn18", "image")
def wrn18(
    num_labels: int,
    widen_factor: int = 4,
    image_size: int = 224,
    num_channels: int = 3,
    small_stem: bool = False,
) -> ModelBundle:
    """WRN-18-k, random init (the paper pretrains it): stages 64k/128k/256k/512k, ImageNet stem."""
    return _create_wrn(num_labels, widen_factor, 64, image_size, num_channels, small_stem)


@register_model("wrn18-tiny", "image")
def wrn18_tiny(
    num_labels: int, widen_factor: int = 2, base_width: int = 4, image_size: int = 32, num_channels: int = 3
) -> ModelBundle:
    """The WRN-18 layout with stages 8/16/32/64 and a small-image stem, random init, for tests."""
    return _create_wrn(num_labels, widen_factor, base_width, image_size, num_channels, small_stem=True)
