"""dino-fast: the fastest DINO trainer.

`kernels/` installs as `dino_fast.kernels` and `pipelines/` as
`dino_fast.pipelines`, so nothing clashes with other top-level packages.
"""
from setuptools import find_packages, setup


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
        "export": ["safetensors"],
        "test": ["pytest", "pytest-benchmark", "scikit-image", "safetensors"],
    },
    entry_points={"console_scripts": ["dino-fast=dino_fast.cli:main"]},
)
