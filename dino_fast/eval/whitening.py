"""PCA whitening learned on a separate image set, as the reference
eval_copy_detection.py (utils.PCA with whit = 0.5):

    mu  = mean of the whitening features x_i
    C   = (1/n) sum x_i x_i^T         (the reference: the second moment of the
                                       *uncentred* features; centred=True uses
                                       the covariance instead)
    C   = V diag(d) V^T,  d clamped below at 1e-5 * max(d), sorted descending
    P   = diag(d^-power) V^T          (power 0.5: full whitening), first `dim` rows
    apply(x) = (x - mu) P^T

Eigen-decomposition in float64 on the CPU (D x D, D <= a few thousand).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class PCAWhitening:
    def __init__(self, dim: int | None = None, power: float = 0.5, centered: bool = False):
        self.dim, self.power, self.centered = dim, power, centered
        self.mean: torch.Tensor | None = None    # (D,)
        self.proj: torch.Tensor | None = None    # (dim, D)
        self.energy: float = 1.0                 # share of the eigenvalue mass kept

    def fit(self, x: torch.Tensor) -> "PCAWhitening":
        """Learn mu and P from features x (N, D)."""
        if x.dim() != 2 or x.shape[0] < 2:
            raise ValueError(f"whitening needs at least 2 feature rows (N, D), got {tuple(x.shape)}")
        x64 = x.detach().double().cpu()
        self.mean = x64.mean(0)
        xc = x64 - self.mean if self.centered else x64
        cov = xc.T @ xc / x64.shape[0]                        # (D, D)
        d, v = torch.linalg.eigh(cov)                         # ascending
        d = d.clamp(min=float(d.max()) * 1e-5)
        total = float(d.sum())
        order = torch.argsort(d, descending=True)[: self.dim or d.numel()]
        d, v = d[order], v[:, order]
        self.energy = float(d.sum()) / total
        self.proj = torch.diag(d.pow(-self.power)) @ v.T      # (dim, D)
        if x.shape[0] < x.shape[1]:
            log.warning("whitening learned from %d images for %d-dimensional features: the covariance is "
                        "rank-deficient (use more whitening images than feature dimensions)", x.shape[0], x.shape[1])
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, dim) whitened, in x's dtype and device."""
        if self.proj is None:
            raise RuntimeError("PCAWhitening.apply before fit")
        mean, proj = self.mean.to(x.device, torch.float64), self.proj.to(x.device, torch.float64)
        return ((x.double() - mean) @ proj.T).to(x.dtype)
