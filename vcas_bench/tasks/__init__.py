"""Task registry: each builder returns a `TaskData` of train/eval `datasets.Dataset`s shaped for a model.

The contract and the registry live in :mod:`vcas_bench.tasks.base`; importing this package registers
every builder.
"""

from vcas_bench.tasks import c4, digits, glue, mnist5k, rt_polarity, vision  # noqa: F401  (registration)
from vcas_bench.tasks.base import (
    TASK_HUB_ASSETS,
    TASK_MODALITIES,
    TASKS,
    TaskData,
    cap_indices,
    compatibility_error,
    create_task,
    package_file,
    register_task,
    split_rows,
)

__all__ = [
    "TASKS",
    "TASK_HUB_ASSETS",
    "TASK_MODALITIES",
    "TaskData",
    "cap_indices",
    "compatibility_error",
    "create_task",
    "register_task",
    "split_rows",
    "package_file",
]
