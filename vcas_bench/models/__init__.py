"""Model registry: each builder returns a `ModelBundle` (the network plus what the runner needs to feed it).

The contract and the registry live in :mod:`vcas_bench.models.base`; importing this package registers
every builder.
"""

from vcas_bench.models import bert, resnet, vit  # noqa: F401  (registration)
from vcas_bench.models.base import (
    MLM_MODELS,
    MODEL_HUB_ASSETS,
    MODEL_MODALITIES,
    MODELS,
    ModelBundle,
    create_model,
    load_pretrained,
    register_model,
)

__all__ = [
    "MLM_MODELS",
    "MODELS",
    "MODEL_HUB_ASSETS",
    "MODEL_MODALITIES",
    "ModelBundle",
    "create_model",
    "register_model",
    "load_pretrained",
]
