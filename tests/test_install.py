"""``pip install vcas-bench`` is the method alone: the wheel's ``vcas_bench.vcas`` and
``vcas_bench.integrations`` import and train in an environment that holds torch and nothing else.

Offline and without downloading torch again: the wheel is built with the installed setuptools
(``--no-build-isolation``); a fresh venv (``--without-pip``) sees, through one ``.pth`` file, a folder
of symlinks to torch and its own requirements in this venv's site-packages, and the unpacked wheel.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib.util, sys, torch
from torch import nn
import vcas_bench.vcas, vcas_bench.integrations
import vcas_bench.integrations.hf, vcas_bench.integrations.lightning
from vcas_bench.integrations.loop import VcasLoop
from vcas_bench.vcas import VcasConfig
assert vcas_bench.vcas.__file__.startswith(sys.argv[1]), vcas_bench.vcas.__file__
for name in ("transformers", "hydra", "omegaconf", "lightning", "datasets", "timm"):
    assert importlib.util.find_spec(name) is None, name

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
    def forward(self, x):
        return x + torch.tanh(self.fc(x))

model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(Block(), Block()), nn.Linear(8, 1))
g = torch.Generator().manual_seed(0)
data = [torch.randn(16, 4, generator=g) for _ in range(8)]
loop = VcasLoop(model, lambda m, x: m(x).square().mean(), extra=lambda: data[0], config=VcasConfig.plus(F=1))
for x in data[1:5]:
    loop.backward(x)
assert loop.controller.phases >= 2 and loop.summary().block_type == "Block"
try:
    vcas_bench.integrations.hf.VcasTrainer
except ImportError as err:
    assert "pip install transformers accelerate" in str(err)
else:
    raise AssertionError("VcasTrainer without transformers")
from vcas_bench.launch import main
try:
    main()
except SystemExit as exit:
    assert exit.code == 2
print("torch-only ok")
"""


def _torch_closure() -> list[importlib.metadata.Distribution]:
    """torch's distribution and, recursively, the installed ones it requires here."""
    seen, todo, out = set(), ["torch"], []
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional platform package this machine does without
        out.append(dist)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return out


def _link_torch_only(target: Path) -> None:
    """Symlinks to every top-level file and folder of torch's closure (and their dist-info)."""
    target.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for dist in _torch_closure():
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            source = site / top
            if source.exists() and not (target / top).exists() and top not in ("..", "__pycache__"):
                (target / top).symlink_to(source)


def _build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built offline from a copy of the files it packages (no build/ in the tree)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "vcas_bench", src / "vcas_bench", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = out.glob("vcas_bench-*.whl")
    return wheel


@pytest.mark.skipif(sys.platform == "win32", reason="symlinked site-packages")
def test_wheel_imports_with_torch_alone(tmp_path):
    wheel = _build_wheel(tmp_path)
    meta = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA")))
        .decode()
    )
    requires = [
        line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert requires == ["Requires-Dist: torch<3,>=2.4"], requires
    assert "Requires-Python: >=3.10" in meta
    unpacked = tmp_path / "wheel"
    zipfile.ZipFile(wheel).extractall(unpacked)
    _link_torch_only(tmp_path / "torch-only")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "torch_only.pth").write_text(f"{tmp_path / 'torch-only'}\n{unpacked}\n")
    result = subprocess.run(
        [python, "-I", "-c", CHECK, str(unpacked)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch-only ok" in result.stdout
    assert 'pip install "vcas-bench[bench]"' in result.stderr


def test_the_method_and_integrations_import_no_framework():
    """Here, where transformers, Lightning and Hydra are installed, importing the method and every
    integration module loads none of them (they are imported when VcasTrainer / VcasCallback are used)."""
    code = (
        "import sys, vcas_bench.vcas, vcas_bench.integrations.loop, vcas_bench.integrations.hf, "
        "vcas_bench.integrations.lightning\n"
        "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning', 'hydra', 'omegaconf', "
        "'datasets', 'accelerate') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
