"""The key cases `dino-fast bench` runs: each hot path against its reference
on the same inputs, timed in the same run (see dino_fast.benchmark.harness.run_case),
and the bytes-moved formula of each memory-bound op (one per op: the cases
here and the suites in bench/ use the same).

Every builder imports what it measures lazily, so one missing piece (no DALI,
a module not installed) is reported as missing by the command, not dropped.
GPU shapes are the default problems (B = 64, K = 65536, 2 + 10 crops; ViT-B/8
+ head for the EMA); smoke (CPU) shapes are tiny and only show that each case
runs and is correct.
"""
from __future__ import annotations

from typing import Callable

import torch

from dino_fast.benchmark.harness import Case, fwd_bwd_step


# --------------------------------------------------------------------------- bytes moved, one formula per op
def dino_loss_traffic(B: int, K: int, ncrops: int, n_teacher_views: int = 2, elem_bytes: int = 4) -> dict:
    """Bytes the fused DINO loss's kernels move in forward + backward (the
    math comment of kernels/dino_loss.py): the student logits read twice and
    their gradient written once, the teacher logits read three times (kernels
    1, 3 and 5), all in the input dtype; the fp32 partials and the L2-resident
    centre aside. Returns record()/Case fields nbytes and floor."""
    student = ncrops * B * K * elem_bytes
    teacher = n_teacher_views * B * K * elem_bytes
    return dict(nbytes=3 * student + 3 * teacher, floor="student 2R+1W, teacher 3R")


def ema_traffic(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> dict:
    """Bytes of one teacher EMA over these tensors (the floor): teacher read
    and written, student read, each in its own dtype."""
    nbytes = sum(t.numel() * (2 * t.element_size() + s.element_size()) for t, s in zip(teacher, student))
    return dict(nbytes=nbytes, floor="teacher 1R+1W, student 1R")


SINKHORN_PASSES = 6   # log-domain Sinkhorn-Knopp: 3 iterations x (prototype pass + sample pass), one teacher read each


def dino_clstoken_loss_traffic(B: int, K: int, n_student: int, n_teacher: int, e_s: int, e_t: int) -> dict:
    """Bytes of the fused DINOv2/DINOv3 CLS loss with Sinkhorn-Knopp centring
    (forward + backward): Sinkhorn-Knopp reads the teacher logits SINKHORN_PASSES
    times; the loss forward reads student + teacher once, the backward reads them
    again and writes the student gradient (the implicit teacher is never
    materialised; partials and K-/B-vectors aside)."""
    nbytes = 3 * n_student * B * K * e_s + (SINKHORN_PASSES + 2) * n_teacher * B * K * e_t
    return dict(nbytes=nbytes, floor=f"student 2R+1W, teacher {SINKHORN_PASSES + 2}R")


def ibot_patch_loss_traffic(n_tokens: int, K: int, e_s: int, e_t: int) -> dict:
    """Bytes of the fused iBOT loss over n_tokens masked patch tokens with
    Sinkhorn-Knopp centring: as dino_clstoken_loss_traffic, one teacher row per
    student row."""
    nbytes = n_tokens * K * (3 * e_s + (SINKHORN_PASSES + 2) * e_t)
    return dict(nbytes=nbytes, floor=f"student 2R+1W, teacher {SINKHORN_PASSES + 2}R")


def _close(rtol: float, atol: float = 0.0) -> Callable:
    """Every output tensor within rtol of the largest reference magnitude (+ atol):
    max|out - ref| <= rtol * max|ref| + atol (robust to tiny elements)."""
    def check(out, ref):
        assert len(out) == len(ref), (len(out), len(ref))
        for i, (a, b) in enumerate(zip(out, ref)):
            assert a.shape == b.shape, (i, a.shape, b.shape)
            a, b = a.detach().double(), b.detach().double()
            err, scale = float((a - b).abs().max()), float(b.abs().max())
            assert err <= rtol * scale + atol, f"output {i}: max error {err:.3g} > {rtol:g} * {scale:.3g} + {atol:g}"
    return check


# --------------------------------------------------------------------------- fused DINO loss
def dino_loss(device: torch.device, smoke: bool) -> Case:
    from dino_fast.losses.dino_loss import DINOLoss
    from dino_fast.kernels.dino_loss_reference import DINOLossReference
    B, K, ncrops = (2, 257, 4) if smoke else (64, 65536, 12)
    dtype = torch.float32
    make = dict(out_dim=K, ncrops=ncrops, warmup_teacher_temp=0.04, teacher_temp=0.04,
                warmup_teacher_temp_epochs=0, nepochs=1)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(ncrops * B, K, generator=g).to(device, dtype).requires_grad_()   # (ncrops*B, K)
    t = torch.randn(2 * B, K, generator=g).to(device, dtype)                         # (2*B, K)
    fused, ref = DINOLoss(**make).to(device), DINOLossReference(**make).to(device)

    def step(loss_fn):
        def run():
            s.grad = None
            loss = loss_fn(s, t, 0)
            loss.backward()
            return loss.detach(), s.grad
        return run
    return Case("dino_loss", step(fused), step(ref), _close(2e-5), ref_name="reference DINOLoss",
                extra=dict(B=B, K=K, ncrops=ncrops, dtype="fp32"),
                **dino_loss_traffic(B, K, ncrops, elem_bytes=s.element_size()))


# --------------------------------------------------------------------------- teacher EMA
def ema(device: torch.device, smoke: bool) -> Case:
    from dino_fast.kernels.ema import ema_update_, ema_update_reference_, vit_b8_dino_param_shapes
    shapes = list(vit_b8_dino_param_shapes(**(dict(out_dim=1000, depth=1, embed_dim=48, img_size=32,
                                                    hidden_dim=64, bottleneck_dim=16) if smoke else {})).values())
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(sh, generator=g).to(device) for sh in shapes]
    teacher = [torch.randn(sh, generator=g).to(device) for sh in shapes]
    teacher_ref = [p.clone() for p in teacher]
    numel = sum(p.numel() for p in teacher)

    def fused():
        ema_update_(teacher, student, 0.996)
        return teacher

    def ref():
        ema_update_reference_(teacher_ref, student, 0.996)
        return teacher_ref
    return Case("ema", fused, ref, _close(1e-6), ref_name="per-parameter loop",
                extra=dict(params=numel, tensors=len(shapes)), **ema_traffic(teacher, student))


# --------------------------------------------------------------------------- model forward + backward
def model(device: torch.device, smoke: bool) -> Case:
    import dino_fast.model as dm
    from dino_fast.model.flops import multicrop_fwd_bwd_flops
    cfg = (dict(arch="vit_tiny", patch=8, depth=2, out_dim=256, hidden=64, bottleneck=32, batch=2,
                sizes=[32, 32] + [16] * 4) if smoke else
           dict(arch="vit_small", patch=16, depth=12, out_dim=65536, hidden=2048, bottleneck=256, batch=32,
                sizes=[224, 224] + [96] * 10))

    def build(packed: bool):
        torch.manual_seed(0)
        backbone = getattr(dm, cfg["arch"])(patch_size=cfg["patch"], depth=cfg["depth"])
        head = dm.DINOHead(backbone.embed_dim, cfg["out_dim"], hidden_dim=cfg["hidden"],
                           bottleneck_dim=cfg["bottleneck"])
        w = dm.MultiCropWrapper(backbone, head)
        w.packed = packed
        return w.to(device).train()
    packed, per_group = build(True), build(False)
    per_group.load_state_dict(packed.state_dict())
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(cfg["batch"], 3, s, s, generator=g).to(device) for s in cfg["sizes"]]
    def step(m):
        run = fwd_bwd_step(m, crops, device)          # (ncrops*B, out_dim) output
        return lambda: (run(),)
    flops = multicrop_fwd_bwd_flops(packed.backbone, cfg["sizes"], cfg["batch"], head=packed.head)
    tol = 1e-4 if device.type == "cpu" else 3e-2
    return Case("model_fwd_bwd", step(packed), step(per_group), _close(tol, tol), flops=flops,
                ref_name="per-resolution groups",
                extra=dict(arch=f"{cfg['arch']}/{cfg['patch']}", batch=cfg["batch"], crops=len(cfg["sizes"])))


# --------------------------------------------------------------------------- data pipeline
def pipeline(device: torch.device, smoke: bool) -> Case:
    from dino_fast.pipelines import MultiCropLoader, dali_available
    from dino_fast.train.demo import demo_source
    if not dali_available():
        raise ImportError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    n, batch = (8, 4) if smoke else (1024, 128)
    source = demo_source(n)
    loaders = {b: MultiCropLoader(source, batch_size=batch, backend=b, device=device, local_crops_number=10)
               for b in ("dali", "torch")}

    def epoch(loader):
        def run():
            seen, shapes = 0, None
            for crops, labels in loader:
                seen += labels.shape[0]
                shapes = [tuple(c.shape) for c in crops]
            if device.type == "cuda":
                torch.cuda.synchronize()
            return seen, shapes
        return run

    def check(out, ref):
        assert out == ref, f"DALI epoch {out} differs from the torch epoch {ref} (images, crop shapes)"
    return Case("pipeline_epoch", epoch(loaders["dali"]), epoch(loaders["torch"]), check,
                ref_name="torch DataLoader", extra=dict(images=n, batch=batch))


# --------------------------------------------------------------------------- one training step
def train_step(device: torch.device, smoke: bool) -> Case:
    from dino_fast.model.flops import dino_step_flops_per_image
    from dino_fast.train.build import build_loss, build_pair, prepare
    from dino_fast.train.optim import build_optimizer, build_schedules, get_params_groups
    from dino_fast.train.presets import resolve
    from dino_fast.train.step import StepState, train_step as step_fn
    over = dict(device=device.type, batch_size_per_gpu=2 if smoke else 32, local_crops_number=2 if smoke else 10)
    if not smoke:
        over.update(global_size=224, local_size=96)

    def build(impls: dict):
        cfg = resolve("demo" if smoke else "vit_s16_in1k", {**over, **impls})
        torch.manual_seed(0)
        student, teacher = build_pair(cfg)
        flops = dino_step_flops_per_image(student.backbone, cfg.global_size, cfg.local_size, 2,
                                          cfg.local_crops_number, head=student.head) * cfg.batch_size_per_gpu
        student, teacher, autocast, scaler = prepare(cfg, student, teacher, device, 1, False)
        st = StepState(cfg, student, teacher, build_loss(cfg, device),
                       build_optimizer(cfg.optimizer, get_params_groups(student)),
                       build_schedules(cfg, 100, 1), autocast, scaler, False)
        return cfg, st, flops
    cfg, fast, flops = build({})
    _, ref, _ = build(dict(loss_impl="torch", ema_impl="loop", attention="math"))
    g = torch.Generator().manual_seed(0)
    sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.local_crops_number
    crops = [torch.randn(cfg.batch_size_per_gpu, 3, s, s, generator=g).to(device) for s in sizes]

    def run(st):
        return lambda: (step_fn(st, crops, 0, 0).detach(),)
    tol = 1e-4 if device.type == "cpu" else 5e-2
    return Case("train_step", run(fast), run(ref), _close(tol, tol), flops=flops,
                ref_name="torch loss + loop EMA + math attention",
                extra=dict(preset="demo" if smoke else "vit_s16_in1k", batch=cfg.batch_size_per_gpu))


# --------------------------------------------------------------------------- k-NN evaluation
def knn(device: torch.device, smoke: bool) -> Case:
    from dino_fast.eval.knn import knn_classifier, knn_classifier_reference
    n_train, n_test, dim, classes = (500, 100, 32, 10) if smoke else (100_000, 10_000, 768, 1000)
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(n_train, dim, generator=g), dim=1).to(device)
    test = torch.nn.functional.normalize(torch.randn(n_test, dim, generator=g), dim=1).to(device)
    train_labels = torch.randint(0, classes, (n_train,), generator=g).to(device)
    test_labels = torch.randint(0, classes, (n_test,), generator=g).to(device)
    args = (train, train_labels, test, test_labels, 20, 0.07, classes)

    def check(out, ref):
        assert abs(out[0] - ref[0]) < 1e-6 and abs(out[1] - ref[1]) < 1e-6, (out, ref)
    return Case("knn", lambda: knn_classifier(*args), lambda: knn_classifier_reference(*args), check,
                flops=2.0 * n_train * n_test * dim, ref_name="reference eval_knn loop",
                extra=dict(train=n_train, test=n_test, dim=dim, k=20))


# name -> builder; `dino-fast bench` runs them in this order
CASES: dict[str, Callable[[torch.device, bool], Case]] = {
    "dino_loss": dino_loss,
    "ema": ema,
    "model_fwd_bwd": model,
    "pipeline_epoch": pipeline,
    "train_step": train_step,
    "knn": knn,
}
