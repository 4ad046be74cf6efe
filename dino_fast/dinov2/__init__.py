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
"""
from dino_fast.dinov2.dino_clstoken_loss import DINOLoss
from dino_fast.dinov2.ibot_patch_loss import iBOTPatchLoss
from dino_fast.dinov2.koleo_loss import KoLeoLoss, KoLeoLossDistributed
from dino_fast.kernels.softmax_teacher import SoftmaxTeacher

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "KoLeoLossDistributed", "SoftmaxTeacher"]
