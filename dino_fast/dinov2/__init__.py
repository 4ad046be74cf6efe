"""DINOv2 / DINOv3 training objectives, fused: drop-ins for the loss modules of
facebookresearch/dinov2 (`dinov2/loss/`) with the same constructors, methods,
state dicts (`center`) and numbers.

    from dino_fast.dinov2 import DINOLoss, iBOTPatchLoss, KoLeoLoss

- `DINOLoss`: CLS-token loss over crop pairs; teacher from `softmax_center_teacher`
  (lazy EMA centre) or `sinkhorn_knopp_teacher` (log domain, cannot overflow);
  `forward` takes DINOv2's lists or DINOv3's (crops, B, K) tensors.
- `iBOTPatchLoss`: masked-patch loss with per-image weights.
- `KoLeoLoss` (and DINOv3's `KoLeoLossDistributed`): the KoLeo regulariser.
The teacher centrings can also return a `SoftmaxTeacher` (materialize=False)
that the losses consume without writing the teacher probabilities.

Names are imported lazily (dino_fast._lazy_exports), so the training presets and config
(dino_fast/dinov2/presets.py, train_config.py) load without torch and `--help` stays instant.
"""
from dino_fast import _lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "DINOLoss": "dino_fast.dinov2.dino_clstoken_loss",
    "iBOTPatchLoss": "dino_fast.dinov2.ibot_patch_loss",
    "KoLeoLoss": "dino_fast.dinov2.koleo_loss",
    "KoLeoLossDistributed": "dino_fast.dinov2.koleo_loss",
    "SoftmaxTeacher": "dino_fast.kernels.softmax_teacher",
}

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "KoLeoLossDistributed", "SoftmaxTeacher"]

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
