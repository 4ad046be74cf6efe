"""dino-fast: the fastest DINO trainer.

`kernels/` installs as `dino_fast.kernels` and `pipelines/` as
`dino_fast.pipelines`, so nothing clashes with other top-level packages.
"""
import sys

import setuptools
from setuptools import find_packages, setup

_FIX = ("Fix: pip install 'setuptools>=64' wheel, then pip install -e . --no-deps --no-build-isolation "
        "(or pip install -e . with build isolation, which fetches setuptools>=64 from pyproject.toml).")


def _refuse_legacy_develop() -> None:
    """`setup.py develop` (pip's editable fallback with setuptools < 64, or a direct call) puts the
    repository root on sys.path: dino_fast.kernels and dino_fast.pipelines would not exist."""
    if "develop" not in sys.argv[1:]:
        return
    found = setuptools.__version__
    why = (f"setuptools {found} has no PEP 660 editable install, so pip fell back to `setup.py develop`"
           if int(found.split(".")[0]) < 64 else "`setup.py develop` is the legacy editable install")
    raise SystemExit(f"dino-fast: {why}, which ignores package_dir: kernels/ and pipelines/ would not "
                     f"install as dino_fast.kernels and dino_fast.pipelines. {_FIX}")


_refuse_legacy_develop()


def _packages(root: str, prefix: str) -> tuple[list[str], dict[str, str]]:
    names = [prefix] + [f"{prefix}.{p}" for p in find_packages(root)]
    dirs = {name: root + name[len(prefix):].replace(".", "/") for name in names}
    return names, dirs


packages, package_dir = [], {}
for root, prefix in (("dino_fast", "dino_fast"), ("kernels", "dino_fast.kernels"),
                     ("pipelines", "dino_fast.pipelines")):
    names, dirs = _packages(root, prefix)
    packages += names
    package_dir.update(dirs)

setup(
    name="dino-fast",
    version="0.1.0",
    description="DINO self-supervised ViT pretraining with fused Triton kernels and GPU data pipelines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"dino_fast": ["data/*.npz", "data/*.json"]},
    include_package_data=True,
    # Core requirements are all present on a machine that already has a CUDA
    # PyTorch stack, so `pip install -e . --no-deps` works there.
    install_requires=[
        "torch>=2.6",  # FSDP2 public names (fully_shard, MixedPrecisionPolicy, FSDPModule)
        "torchvision",
        "numpy",
        "timm",
        "rich",
        "tqdm",
        "pillow",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        "gpu": ["xformers"],   # GPU machines: the xformers attention path and its tests
        "export": ["safetensors"],
        "test": ["pytest", "pytest-benchmark", "scikit-image", "safetensors"],
    },
    entry_points={"console_scripts": ["dino-fast=dino_fast.cli:main"]},
)
