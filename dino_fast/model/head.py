"""DINO projection head (reference: facebookresearch/dino vision_transformer.py).

x -> MLP (Linear-GELU x (nlayers-1), Linear to bottleneck) -> L2-normalize
  -> weight-normalized Linear(bottleneck, out_dim, bias=False).

Weight norm: W = g * v / ||v||_row, g: (out_dim, 1), v: (out_dim, bottleneck).
`WeightNormLinear` holds `weight_g` and `weight_v` as plain parameters and
computes W in forward. This keeps the reference's state-dict keys
(`last_layer.weight_g`, `last_layer.weight_v`) with no key mapping, and avoids
both the deprecated `nn.utils.weight_norm` hook (recomputes `weight` as a
non-leaf attribute: `copy.deepcopy(student)` fails after build, and the
pre-forward hook is invisible to FSDP2) and the parametrization API (renames
the keys to `parametrizations.weight.original0/1` and swaps the module class,
which FSDP2 and torch.compile handle less predictably). With plain parameters
FSDP2 shards g and v like any weight and torch.compile sees ordinary ops.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Linear layer without bias with weight W = g * v / ||v|| (norm per output row)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=5 ** 0.5)  # nn.Linear's default init, as the reference
        # registered g first, v second: the reference's state-dict order
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))  # (out, 1), as weight_norm(dim=0)
        self.weight_v = nn.Parameter(v)                            # (out, in)

    @property
    def weight(self) -> torch.Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)                      # (R, bottleneck)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)            # (R, out_dim)
