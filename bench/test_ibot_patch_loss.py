"""DINOv2 / DINOv3 iBOT masked-patch loss with Sinkhorn-Knopp centring, fused
vs DINOv2's formulation, forward + backward, timed in the same run.

Problem (per GPU): 128 global crops (B = 64) of 256 patches; half the crops
masked, each with a mask ratio drawn in [0.1, 0.5] (DINOv2's defaults:
mask_sample_probability 0.5, mask_ratio_min_max (0.1, 0.5)) -- ~4,900 masked
tokens; K = 65536 and 262144; logits fp32 or bf16, teacher temperature 0.04,
teacher logits N(0, 0.5^2) (DINOv2's plain exp stays finite).
- fused: log-domain Sinkhorn-Knopp returning the implicit teacher +
  `iBOTPatchLoss.forward_masked` (weights 1 / masked patches of each image,
  divided by the number of images), teacher probabilities never written.
- reference (DINOv2): plain Sinkhorn-Knopp (`sinkhorn_knopp_reference` with the
  masked-token count) + log_softmax cross-entropy per token
  (`softmax_ce_reference`, the fallback DINOv2 takes without xformers'
  cross_entropy), weighted and divided by the number of images.
Smoke mode (CPU): tiny shapes through the Triton interpreter, correctness only.
"""
import pytest
import torch

from dino_fast.benchmark.baseline import save_record
from dino_fast.benchmark.cases import ibot_patch_loss_traffic
from dino_fast.benchmark import peak_extra_memory
from dino_fast.dinov2 import iBOTPatchLoss
from dino_fast.kernels.sinkhorn_knopp import sinkhorn_knopp_reference
from dino_fast.kernels.softmax_ce import softmax_ce_reference

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
TAU = 0.04


def _masks(images: int, patches: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(images, patches, dtype=torch.bool)
    for i in range(0, images, 2):                                # every other crop masked
        n = int(patches * (0.1 + 0.4 * torch.rand((), generator=g)))
        masks[i, torch.randperm(patches, generator=g)[:n]] = True
    return masks.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K", [65536, 262144])
def test_ibot_patch_loss(bench_case, device, smoke, K, dtype):
    images, patches, K = (5, 13, 257 + (K == 262144) * 256) if smoke else (128, 256, K)
    masks = _masks(images, patches, device)                      # (images, patches)
    n = int(masks.sum())                                         # the collate function knows it on the host
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]   # (n,)
    g = torch.Generator(device=device).manual_seed(0)
    teacher = (torch.randn(n, K, generator=g, device=device) * 0.5).to(dtype)          # (n, K)
    student = (torch.randn(n, K, generator=g, device=device) * 3).to(dtype).requires_grad_()
    loss_fn = iBOTPatchLoss(K, impl="triton").to(device)
    n_tensor = torch.tensor([n], device=device)

    def fused():
        student.grad = None
        q = loss_fn.sinkhorn_knopp_teacher(teacher, TAU, n_tensor, materialize=False)
        loss = loss_fn.forward_masked(student, q, masks, n_masked_patches=n, masks_weight=weight)
        loss.backward()
        return loss.detach(), student.grad

    def reference():
        student.grad = None
        q = sinkhorn_knopp_reference(teacher, TAU, n_samples=n_tensor)
        loss = softmax_ce_reference(student[None], q[None], weights=weight, scale=1.0 / images)
        loss.backward()
        return loss.detach(), student.grad

    def check(out, ref):
        (loss, grad), (ref_loss, ref_grad) = out, ref
        torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=1e-4, atol=0)
        err = float((grad.double() - ref_grad.double()).abs().max() / ref_grad.double().abs().max())
        assert err <= (1e-4 if dtype == torch.float32 else 2e-2), err

    mem, ref_mem = peak_extra_memory(fused), peak_extra_memory(reference)
    rec = bench_case(f"ibot_patch_loss_{NAMES[dtype]}_K{K}", fused, reference, check=check,
                     **ibot_patch_loss_traffic(n, K, student.element_size(), teacher.element_size()),
                     ref_name="DINOv2: plain Sinkhorn-Knopp + log_softmax CE", images=images, masked_tokens=n,
                     K=K, dtype=NAMES[dtype], peak_extra_mem_ref_bytes=ref_mem,
                     mem_ratio=(ref_mem / mem) if mem else None)
    if not smoke:
        save_record("ibot_patch_loss", f"{NAMES[dtype]}_K{K}", rec)
        assert rec["speedup"] > 1, rec
