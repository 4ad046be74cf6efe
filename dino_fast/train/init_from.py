"""`--init_from PATH`: continued pretraining from any backbone `dino_fast.load` reads.

The file is read once (`read_init`); the backbone is built with the file's architecture and the
run's training options (drop path, RoPE augmentations and activation checkpointing on the
student), then loaded strictly (`load_backbone`). A learned position embedding is then resized
to the global crop size and stored at that size, computed exactly as the model's own runtime
interpolation would (timm-style exact-size antialiased resampling for DINOv2-with-registers and
timm weights, the reference's for the others), so the first step's teacher features equal the
loaded backbone's. The DINO head is loaded when the file has one (`head.*`, DINOv2's
`dino_head.*`) of the run's shape, else it starts fresh (released weights ship without heads).
Generic for every method: build the backbone, then load.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.nn as nn

from dino_fast.model.backbone_config import BackboneConfig

log = logging.getLogger(__name__)


@dataclass
class InitSource:
    path: str
    config: BackboneConfig
    backbone: dict | None   # backbone state dict in dino-fast's layout (None: the architecture only)
    head: dict | None       # the DINO head's state dict, when the file has one

    def architecture_only(self) -> "InitSource":
        """The same architecture without weights (`--dry_run` builds on the meta device)."""
        return InitSource(self.path, self.config, None, None)


def read_init(path: str, checkpoint_key: str = "teacher") -> InitSource:
    from dino_fast.eval.load import backbone_state_dict, head_state_dict, infer_config, read_checkpoint
    obj, meta = read_checkpoint(path)
    sd, args, hints = backbone_state_dict(obj, checkpoint_key, path)
    cfg = infer_config(sd, args, meta, path=path, hints=hints)
    head = head_state_dict(obj, checkpoint_key, path)
    log.info("--init_from %s: %s (%s layout, %s weights%s)", path, cfg.name, cfg.layout, checkpoint_key,
             ", with its DINO head" if head else "")
    return InitSource(path, cfg, sd, head)


def load_backbone(backbone: nn.Module, init: InitSource, img_size: int) -> None:
    """Load the weights, then store a learned position embedding resized for img_size crops."""
    from dino_fast.eval.load import complete_state_dict, load_state_dict_strict
    if init.backbone is not None:
        load_state_dict_strict(backbone, complete_state_dict(backbone, init.backbone, init.config), init.path)
    if getattr(backbone, "pos_embed", None) is not None:
        before = backbone.patch_embed.img_size
        backbone.resize_pos_embed(img_size)
        if before != img_size:
            log.info("--init_from: pos_embed resized from %d px to the %d px global crops", before, img_size)


def load_head(head: nn.Module, init: InitSource) -> bool:
    """Load the file's DINO head into `head` when it has the same parameters; False otherwise."""
    if not init.head:
        return False
    own = head.state_dict()
    if set(own) != set(init.head) or any(own[k].shape != v.shape for k, v in init.head.items()):
        log.warning("--init_from %s: its DINO head does not fit this run's head (out_dim / hidden / bottleneck); "
                    "the head starts fresh", init.path)
        return False
    head.load_state_dict(init.head, strict=True)
    return True
