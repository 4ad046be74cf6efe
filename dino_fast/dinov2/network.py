"""The networks of the dinov2 method: backbone + DINO head (+ a separate iBOT
head), one forward that runs the whole student or teacher side of a step, so
FSDP2's root hooks (build.shard: every block, then the root holding the
heads) unshard the heads around it.

Student: all crops through the backbone in one packed sequence, the global
crops' masked patches replaced by the mask token (VisionTransformer
`forward_features(crops, masks)`); then the heads run on exactly the rows
the losses need, gathered with `index_select` (the flat indices of the
masked patches come from the host, so nothing waits on the device):
  shared head:   DINO head on [global CLS, local CLS, masked patch tokens] at once;
  separate head: DINO head on the CLS tokens, iBOT head on the masked patch tokens.
No padding to DINOv2's `upperbound` buffer: the gathered rows are the masked ones.
Teacher: the global crops only, unmasked, same heads on the same positions.
"""
from __future__ import annotations

import torch
from torch import nn


class DINOv2Network(nn.Module):
    """backbone (a dino_fast ViT with a mask token), head (DINO head; the name the DINO path's
    tools look for), ibot_head (None: shared with the DINO head)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, ibot_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.ibot_head = ibot_head

    def forward(self, crops: list[torch.Tensor], masks: list | None = None,
                mask_indices: torch.Tensor | None = None, n_global: int = 2) -> dict[str, torch.Tensor]:
        """crops: [global crops (B, 3, S, S)] * n_global + [local crops]; masks: one (B, N) bool or
        None per crop; mask_indices: flat indices into the global crops' (n_global*B*N) patches.
        Returns global_cls (n_global*B, D) backbone CLS, global_patches (n_global*B, N, D),
        global_logits (n_global*B, K), local_logits (n_local*B, K) (empty without locals),
        patch_logits (n_masked, K_ibot) (None without mask_indices)."""
        feats = self.backbone.forward_features(list(crops), masks)
        g = feats[0]
        rows_g = n_global * crops[0].shape[0]
        if g["x_norm_clstoken"].shape[0] != rows_g:
            raise ValueError(f"the first {n_global} crops must share one resolution (the global crops); got "
                             f"{g['x_norm_clstoken'].shape[0]} rows in the first group for {rows_g}")
        g_cls, g_patch = g["x_norm_clstoken"], g["x_norm_patchtokens"]            # (Rg, D), (Rg, N, D)
        l_cls = torch.cat([f["x_norm_clstoken"] for f in feats[1:]]) if len(feats) > 1 else g_cls[:0]
        masked = None
        if mask_indices is not None:
            masked = torch.index_select(g_patch.flatten(0, 1), 0, mask_indices)  # (n_masked, D)
        cls = torch.cat((g_cls, l_cls))                                           # (Rg + Rl, D)
        if masked is not None and self.ibot_head is None:
            out = self.head(torch.cat((cls, masked)))                           # one head pass, all rows
            logits, patch_logits = out[:cls.shape[0]], out[cls.shape[0]:]
        else:
            logits = self.head(cls)
            patch_logits = self.ibot_head(masked) if masked is not None else None
        return {"global_cls": g_cls, "global_patches": g_patch, "global_logits": logits[:rows_g],
                "local_logits": logits[rows_g:], "patch_logits": patch_logits}


class GramTeacher(nn.Module):
    """DINOv3's frozen Gram teacher: a backbone only; forward gives its patch features."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)["x_norm_patchtokens"]      # (R, N, D)


def build_dinov2_network(cfg, student: bool, init=None) -> DINOv2Network:
    """The backbone of `cfg` with a mask token, the DINO head, the iBOT head when separate;
    on the CPU in fp32 (the teacher: no drop path; heads with norm_last_layer only on the student,
    as the DINO path)."""
    import dataclasses

    from dino_fast.model import DINOHead
    from dino_fast.train.build import build_backbone
    if init is not None and not init.config.mask_token:   # --init_from a backbone without one: a fresh (zero) token
        sd = init.backbone
        if sd is not None and "mask_token" not in sd:
            sd = {**sd, "mask_token": torch.zeros(1, init.config.embed_dim)}
        init = dataclasses.replace(init, config=dataclasses.replace(init.config, mask_token=True), backbone=sd)
    backbone = build_backbone(dataclasses.replace(cfg, mask_token=True), student, init)
    if student and cfg.drop_path_uniform and cfg.drop_path_rate:
        for blk in backbone.blocks:                 # DINOv2 drop_path_uniform: every block at the full rate
            blk.drop_path.drop_prob = cfg.drop_path_rate
    nll = cfg.norm_last_layer if student else True
    head = DINOHead(backbone.embed_dim, cfg.out_dim, use_bn=False, norm_last_layer=nll,
                    hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
    if init is not None:
        from dino_fast.train.init_from import load_head
        load_head(head, init)
    ibot_head = None
    if cfg.ibot_separate_head:
        ibot_head = DINOHead(backbone.embed_dim, cfg.ibot_out_dim, use_bn=False, norm_last_layer=nll,
                             hidden_dim=cfg.ibot_head_hidden_dim, bottleneck_dim=cfg.ibot_head_bottleneck_dim)
    return DINOv2Network(backbone, head, ibot_head)


def build_dinov2_pair(cfg) -> tuple[DINOv2Network, DINOv2Network]:
    """(student, teacher) with teacher = student's weights and no gradients."""
    from dino_fast.train.build import build_pair
    return build_pair(cfg, network=build_dinov2_network)
