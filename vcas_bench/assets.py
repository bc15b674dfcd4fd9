"""Assets that only the Hugging Face hub serves (checkpoints, datasets): one error type and a cache check.

The builders keep the real loading code (`from_pretrained("bert-large-uncased")`,
`load_dataset("nyu-mll/glue", "mnli")`) for online users. Offline, every builder that cannot find its
asset raises :class:`MissingAsset`, whose message is one line naming the asset and the override that
points at a local copy; the CLI prints it and exits 2 instead of a traceback. Each builder also declares
its hub assets (:class:`HubAsset`) so that, offline, the CLI can name every missing one at once before
any model or data is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["HubAsset", "MissingAsset", "hub_is_offline", "missing_assets_line"]

TRUE = {"1", "on", "yes", "true"}


class MissingAsset(FileNotFoundError):
    """A checkpoint or dataset that is neither local nor downloadable; the message says how to provide it."""


@dataclass(frozen=True)
class HubAsset:
    """One file set on the hub that a builder would download, and the override that replaces it.

    Attributes:
        what: How the error names it, e.g. "checkpoint 'bert-large-uncased'".
        repo: Hub repository id, e.g. "bert-large-uncased", "nyu-mll/glue".
        repo_type: "model" or "dataset".
        override: The setting that points at a local copy, with what it must hold.
        files: For models: any one of these cached means the repository is cached.
        streamed: Read as a stream (C4): a cache never serves it offline.
    """

    what: str
    repo: str
    repo_type: str
    override: str
    files: tuple[str, ...] = ("config.json",)
    streamed: bool = False

    def is_cached(self) -> bool:
        if self.streamed:
            return False
        if self.repo_type == "dataset":
            return _dataset_is_cached(self.repo)
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(self.repo, f), str) for f in self.files)


def _dataset_is_cached(repo: str) -> bool:
    """The hub's file cache or the datasets library's prepared cache holds something of ``repo``."""
    from huggingface_hub import constants

    folders = [os.path.join(constants.HF_HUB_CACHE, "datasets--" + repo.replace("/", "--"))]
    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    folders.append(os.path.join(datasets_cache, repo.replace("/", "___")))
    return any(os.path.isdir(folder) for folder in folders)


def hub_is_offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set: nothing will be downloaded."""
    return any(os.environ.get(name, "").lower() in TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def missing_assets_line(assets: list[HubAsset]) -> str | None:
    """One line naming every asset that is not cached and how to point at a local copy, or None."""
    missing = [asset for asset in assets if not asset.is_cached()]
    if not missing:
        return None
    parts = "; ".join(f"{asset.what} from the hub (set {asset.override})" for asset in missing)
    return f"offline and not in the HF cache: {parts}"
