"""Every registered model: builds offline, right logits shape, findable VCAS block, gradients everywhere."""

import os
import tempfile

# Before transformers/huggingface_hub import: never reach the network, never read a user cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="vcas-hf-"))

import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vcas_bench.assets import MissingAsset  # noqa: E402
from vcas_bench.models import MODEL_MODALITIES, MODELS, ModelBundle, create_model  # noqa: E402

OFFLINE_MODELS = ["minilm", "bert-tiny", "vit-tiny", "timm-vit-tiny", "wrn18-tiny"]
RANDOM_LARGE_MODELS = ["wrn18"]  # random init, built offline; checked on the meta device (no memory)
HUB_MODELS = ["bert-base", "bert-large", "vit-base", "vit-large"]
NUM_LABELS, BATCH = 3, 2


def fake_batch(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """A tiny batch in the runner's format for the bundle's modality."""
    labels = torch.arange(BATCH) % NUM_LABELS
    if bundle.modality == "text":
        text = ["a gripping, well acted film", "dull"]
        encoded = bundle.tokenizer(
            text, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
        )
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": labels,
        }
    size, channels = bundle.image_size, bundle.num_channels
    return {"pixel_values": torch.randn(BATCH, channels, size, size), "labels": labels}


@pytest.fixture(scope="module", params=OFFLINE_MODELS)
def built(request: pytest.FixtureRequest) -> tuple[str, ModelBundle]:
    torch.manual_seed(0)
    return request.param, create_model(request.param, num_labels=NUM_LABELS)


def test_every_registered_model_is_covered() -> None:
    assert sorted(OFFLINE_MODELS + HUB_MODELS + RANDOM_LARGE_MODELS) == MODELS.names()


def test_bundle_fields(built: tuple[str, ModelBundle]) -> None:
    name, bundle = built
    assert bundle.modality == MODEL_MODALITIES[name]
    if bundle.modality == "text":
        assert bundle.tokenizer is not None and bundle.tokenizer.vocab_size == 30522
        assert bundle.image_size is None and bundle.num_channels is None
    else:
        assert bundle.tokenizer is None
        assert (bundle.image_size, bundle.num_channels) == (32, 3)


def test_block_type_is_findable(built: tuple[str, ModelBundle]) -> None:
    _, bundle = built
    blocks = [m for m in bundle.model.modules() if type(m).__name__ == bundle.block_type]
    expected = {"minilm": 6, "wrn18-tiny": 8}.get(built[0], 2)
    assert len(blocks) == expected


def test_forward_backward(built: tuple[str, ModelBundle]) -> None:
    _, bundle = built
    model = bundle.model.train()
    model.zero_grad(set_to_none=True)
    batch = fake_batch(bundle)
    logits = bundle.logits_fn(model, batch)
    assert logits.shape == (BATCH, NUM_LABELS)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, batch["labels"]).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    for name, param in model.named_parameters():
        assert param.grad.shape == param.shape, name
        assert torch.isfinite(param.grad).all(), name


def test_minilm_loads_pretrained_weights() -> None:
    """The checkpoint's weights are used, not a fresh init: two builds share every non-head tensor."""
    torch.manual_seed(0)
    first = create_model("minilm", num_labels=2).model.state_dict()
    torch.manual_seed(1)
    second = create_model("minilm", num_labels=2).model.state_dict()
    body = [k for k in first if not k.startswith("classifier.")]
    assert len(body) > 90
    assert all(torch.equal(first[k], second[k]) for k in body)
    assert not torch.equal(first["classifier.weight"], second["classifier.weight"])


def test_dropout_override() -> None:
    bundle = create_model("bert-tiny", num_labels=2, dropout=0.3)
    assert bundle.model.config.hidden_dropout_prob == 0.3
    assert bundle.model.config.attention_probs_dropout_prob == 0.3
    assert create_model("minilm", num_labels=2).model.config.hidden_dropout_prob == 0.1  # checkpoint's own


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_models_fail_clearly_offline(name: str) -> None:
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is off: building would download a large checkpoint")
    with pytest.raises(MissingAsset, match=r"model\.args\.path"):
        create_model(name, num_labels=2)


@pytest.mark.parametrize("name", ["minilm", "bert-base", "vit-large"])
def test_missing_local_path_fails_clearly(name: str, tmp_path: os.PathLike) -> None:
    with pytest.raises(MissingAsset, match=r"model\.args\.path"):
        create_model(name, num_labels=2, path=str(tmp_path / "absent"))


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="valid models: bert-base, bert-large, bert-tiny, minilm"):
        create_model("nope", num_labels=2)


def test_wrn18_is_resnet18_widened_four_times() -> None:
    """The paper's CNN (Table 8): 8 BasicBlocks, stages 256/512/1024/2048, 64-channel ImageNet stem, about
    180M parameters; no nn.Linear inside a block (VCAS runs activation-only on it)."""
    with torch.device("meta"):
        bundle = create_model("wrn18", num_labels=1000)
    model = bundle.model
    blocks = [m for m in model.modules() if type(m).__name__ == bundle.block_type]
    assert len(blocks) == 8 and (bundle.image_size, bundle.num_channels) == (224, 3)
    assert [stage[-1].conv2.out_channels for stage in model.stages] == [256, 512, 1024, 2048]
    assert model.stem[0].kernel_size == (7, 7) and model.stem[0].out_channels == 64
    assert sum(p.numel() for p in model.parameters()) == 180_191_016
    assert not any(isinstance(m, torch.nn.Linear) for b in blocks for m in b.modules())


@pytest.mark.parametrize("name", ["vit-base"])  # vit-large is the same code and takes 10 s to build
def test_timm_backend_fails_clearly_offline(name: str) -> None:
    """backend=timm offline without a cached checkpoint: one line naming the timm checkpoint and the
    local-file override."""
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is off: building would download a large checkpoint")
    timm_name = f"vit_{name.split('-')[1]}_patch16_224.augreg_in21k"
    with pytest.raises(FileNotFoundError, match=rf"timm checkpoint '{timm_name}'.*model\.args\.path=") as err:
        create_model(name, num_labels=2, backend="timm")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="model.args.path=.* is neither a weights file"):
        create_model(name, num_labels=2, backend="timm", path="/nonexistent/weights.safetensors")


@pytest.mark.parametrize("as_folder", [False, True])
def test_timm_backend_loads_a_local_weights_file(tmp_path, as_folder: bool) -> None:
    """The timm path of vit-base/large with model.args.path: a small timm ViT saved to disk (a file, or a
    folder holding model.safetensors) is loaded through pretrained_cfg_overlay: same block weights, fresh
    3-class head, and the result wraps for VCAS (2 `Block`s, 8 sampled linears)."""
    import safetensors.torch
    import timm

    from vcas_bench.models.vit import _create_timm_vit
    from vcas_bench.vcas import wrap

    arch = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **arch)
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(file))
    bundle = _create_timm_vit("vit_tiny_patch16_224", 3, str(tmp_path if as_folder else file), **arch)
    loaded, saved = bundle.model.state_dict(), source.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if not k.startswith("head."))
    assert bundle.model.head.out_features == 3 and (bundle.block_type, bundle.image_size) == ("Block", 32)
    wrapped = wrap(bundle.model, bundle.block_type)
    assert len(wrapped.block_names) == 2 and len(wrapped.engine.linears) == 8
    logits = bundle.logits_fn(bundle.model, fake_batch(bundle))
    assert logits.shape == (BATCH, 3)
