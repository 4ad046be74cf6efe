"""Triton kernels of dino-fast, each with its plain-PyTorch reference beside it.

Installed as `dino_fast.kernels`. Every kernel module declares the compile
specs its launchers use in `compile_specs()` (see `spec.py`), so
`dino-fast kernels` can compile each of them ahead of time for real GPUs.
"""
