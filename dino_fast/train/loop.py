"""`train(cfg)`: the DINO training loop (data → forward → loss → backward →
step → EMA → log). The step itself is in step.py, the models in build.py.

No host synchronisation between logging steps: the loss, the non-finite flag
and the data-wait time accumulate on the device / host side and are read once
every `log_interval` steps (one all-reduce under FSDP).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dino_fast.kernels.dino_loss import STAT_NAMES

from . import checkpoint
from .build import build_loss, build_pair, prepare  # noqa: F401  (the DINO path, via methods.py)
from .config import ConfigError, TrainConfig, to_dict
from .config import save as save_config
from .logger import RunLogger
from .methods import method_parts
from .optim import build_optimizer, build_schedules, get_params_groups  # noqa: F401
from .step import StepState, train_step  # noqa: F401

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss, collapse); the message says why and what to do."""


@dataclass
class Run:
    """Process placement of this run."""
    rank: int
    world_size: int
    device: torch.device
    use_fsdp: bool


def setup(cfg: TrainConfig) -> Run:
    """Process group (torchrun / SLURM / plain via dino_fast.runtime.launch) and device."""
    if dist.is_available() and dist.is_initialized():  # a caller (tests, notebooks) set it up already
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    else:
        from dino_fast.runtime.launch import init_distributed
        info = init_distributed(timeout_minutes=cfg.dist_timeout, backend="gloo" if cfg.device == "cpu" else None)
        rank, world, device = info.rank, info.world_size, info.device
    if cfg.device == "cpu":
        device = torch.device("cpu")
    elif cfg.device == "cuda" and device.type != "cuda":
        raise ConfigError("--device cuda but no CUDA GPU is visible: use --device cpu (or auto)")
    if cfg.fsdp == "off" and world > 1:
        raise ConfigError(f"--fsdp off with {world} processes: multi-process training shards with FSDP2; "
                          "use --fsdp auto")
    use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and world > 1)
    return Run(rank, world, device, use_fsdp)


def build_loader(cfg: TrainConfig, run: Run):
    from dino_fast.pipelines import MultiCropLoader
    from .demo import demo_source
    source = demo_source(cfg.max_images) if cfg.data_path == "demo" else cfg.data_path
    # the reference's blur sigma (0.1-2.0 px) is meant for 224 px crops: keep it in proportion
    scale = cfg.global_size / 224
    return MultiCropLoader(source, cfg.batch_size_per_gpu, global_crops_scale=cfg.global_crops_scale,
                           blur_sigma=(0.1 * scale, 2.0 * scale),
                           local_crops_scale=cfg.local_crops_scale, local_crops_number=cfg.local_crops_number,
                           global_size=cfg.global_size, local_size=cfg.local_size, backend=cfg.pipeline,
                           device=run.device, rank=run.rank, world_size=run.world_size, seed=cfg.seed,
                           num_workers=cfg.num_workers)


def _timed(loader):
    """(batch, seconds waited for it) per step; on CUDA the wait is measured on the device
    and added up by `.take()` at the logging step (data_wait.py says why)."""
    from .data_wait import DataWait
    return DataWait(loader)


class _Window:
    """Sums over the steps since the last logging step: the loss and the first non-finite
    iteration on the device (no sync per step), the data-wait seconds on the host."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.bad_it = torch.full((), -1, dtype=torch.long, device=device)
        self.n, self.wait, self.t0 = 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, it: int, waited: float) -> None:
        self.loss += loss
        self.bad_it = torch.where(torch.isfinite(loss) | (self.bad_it >= 0), self.bad_it,
                                  torch.full_like(self.bad_it, it))
        self.n, self.wait = self.n + 1, self.wait + waited

    def merge(self, other: "_Window") -> None:
        self.loss += other.loss
        self.n, self.wait = self.n + other.n, self.wait + other.wait

    def read(self, dino_loss, world_size: int, epoch: int, last_ckpt) -> tuple[dict, float]:
        """Mean loss and health stats over ranks (one all-reduce), read on the host; stops on a
        non-finite loss. Returns (values, seconds since the window opened)."""
        stats = getattr(dino_loss, "last_stats", {})
        names = [k for k in (*STAT_NAMES, *getattr(dino_loss, "extra_stat_names", ())) if k in stats]
        vec = torch.stack([self.loss.float() / self.n] + [stats[k].float() for k in names])
        bad = self.bad_it.clone()
        if world_size > 1:
            from dino_fast.runtime.launch import named_collective
            named_collective("all_reduce log stats", dist.all_reduce, vec)
            named_collective("all_reduce non-finite flag", dist.all_reduce, bad, op=dist.ReduceOp.MAX)
            vec /= world_size
        values, first_bad = vec.tolist(), int(bad)
        if first_bad >= 0:
            raise TrainingStopped(
                f"non-finite loss at iteration {first_bad} (epoch {epoch + 1}); the last good checkpoint "
                f"is {last_ckpt or 'none (no epoch finished yet)'}. Usual fixes: --precision bf16 "
                f"instead of fp16, a lower --lr, --clip_grad 3.0, a smaller --teacher_temp.")
        return dict(zip(["loss"] + names, values)), time.perf_counter() - self.t0


def _check_collapse(monitor, rec: dict, cfg, dino_loss, run: Run, it: int, last_ckpt, logger) -> None:
    """Feed the collapse monitor (same averaged values on every rank); warn, or stop with
    --stop_on_collapse."""
    if "teacher_entropy" not in rec:
        return
    alarm = monitor.update(rec, rec["epoch"], context=dict(
        teacher_temp=cfg.teacher_temp, warmup_teacher_temp=cfg.warmup_teacher_temp,
        warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
        center_momentum=getattr(dino_loss, "center_momentum", 0.9), lr=rec["lr"], base_lr=cfg.lr,
        batch_size=cfg.batch_size_per_gpu * run.world_size, batch_size_per_gpu=cfg.batch_size_per_gpu,
        world_size=run.world_size, grad_accum_steps=cfg.grad_accum_steps, momentum_teacher=cfg.momentum_teacher,
        norm_last_layer=cfg.norm_last_layer, step=it, checkpoint=last_ckpt or "none yet"))
    if not alarm:
        return
    log.warning(alarm)
    logger.warnings.append(alarm)
    if cfg.stop_on_collapse:
        raise TrainingStopped(f"{alarm}\nStopped (--stop_on_collapse); the last good checkpoint is "
                              f"{last_ckpt or 'none (no epoch finished yet)'}.")


def _oom(cfg, run, exc):
    """The OOM re-raised with the memory plan's numbers and the three remedies."""
    from dino_fast.runtime.memory import memory_plan_from_config, oom_error
    try:
        plan = memory_plan_from_config(cfg, world_size=run.world_size, gpu_memory=cfg.gpu_memory or None)
    except Exception:  # the plan is a help, never a second failure
        plan = None
    return oom_error(exc, plan=plan, cfg=cfg, world_size=run.world_size)


def train(cfg: TrainConfig) -> dict:
    """Train under `cfg`; returns a summary dict (losses, k-NN before/after for the demo).
    SIGINT / SIGTERM / SIGUSR1 stop it cleanly (interrupt.py): raises interrupt.Interrupted."""
    from .interrupt import StopSignals
    with StopSignals() as stop:
        return _train(cfg, stop)


def _train(cfg: TrainConfig, stop) -> dict:
    run = setup(cfg)
    stop.rank, stop.world_size, stop.device = run.rank, run.world_size, run.device
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (FSDP shards them)
    from .data_check import checked_loader  # userdata: data errors before anything is written
    loader = checked_loader(build_loader, cfg, run)
    # ============ resume check (reads only), then the first writes ============
    from .resume_check import check_resume, record
    from .stale import remove_stale
    resume = check_resume(cfg, cfg.output_dir, run.world_size, len(loader.source))
    if run.rank == 0:
        remove_stale(cfg.output_dir)
        save_config(cfg, cfg.output_dir)
    # ============ models, loss, optimizer, schedules ============
    parts = method_parts(cfg, sys.modules[__name__])  # --method: dino (build/optim/step) or dinov2 (dino_fast/dinov2)
    student, teacher = parts.build_pair(cfg)
    from dino_fast.model.backbone_config import config_from_model
    run_args = {**to_dict(cfg), "backbone_config": config_from_model(student.backbone).to_dict(),  # exact, for load
                "resume": record(cfg, run.world_size, len(loader.source))}
    from dino_fast.model.flops import dino_step_flops_per_image
    flops_img = dino_step_flops_per_image(student.backbone, cfg.global_size, cfg.local_size, 2,
                                          cfg.local_crops_number, head=student.head)
    student, teacher, autocast, scaler = prepare(cfg, student, teacher, run.device, run.world_size, run.use_fsdp)
    dino_loss = parts.build_loss(cfg, run.device)
    optimizer = build_optimizer(cfg.optimizer, parts.params_groups(cfg, student), fused=cfg.fused_optimizer)
    schedules = parts.build_schedules(cfg, len(loader), run.world_size)
    st = StepState(cfg, student, teacher, dino_loss, optimizer, schedules, autocast, scaler, run.use_fsdp)
    # ============ resume ============
    start_epoch, it, last_ckpt = 0, 0, None
    if resume is not None:
        last_ckpt = resume.path
        pos = checkpoint.load(last_ckpt, st, world_size=run.world_size, use_fsdp=run.use_fsdp)
        start_epoch, it = pos["epoch"], pos["it"]
        log.info("resumed from %s at epoch %d (iteration %d)%s", last_ckpt, start_epoch, it,
                 "".join(f"; accepted: {n}" for n in resume.notes) if run.rank == 0 else "")
    summary = {"output_dir": cfg.output_dir, "start_epoch": start_epoch, "epochs": []}
    knn = cfg.knn_eval and cfg.data_path == "demo" and run.world_size == 1
    if knn:
        from .demo import knn_top1
        summary["knn_before"] = knn_top1(teacher.backbone, cfg.global_size, run.device, phase="before training")
    from dino_fast.runtime.health import CollapseMonitor
    monitor = CollapseMonitor(cfg.out_dim, patience=cfg.collapse_patience,
                              warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs)
    ibot_monitor = parts.ibot_monitor(cfg) if parts.ibot_monitor else None  # dinov2: the iBOT head's too
    logger = RunLogger(cfg.output_dir, run.rank == 0, cfg.epochs, len(loader), getattr(loader, "backend", "?"),
                       resume_it=it)
    from dino_fast.eval.monitor import KnnMonitor  # --monitor_knn: sharded teacher k-NN every N epochs
    knn_monitor = KnnMonitor.from_config(cfg, run.rank, run.world_size, run.device) if cfg.monitor_knn else None
    from dino_fast.devices import bf16_peak_tflops
    peak = bf16_peak_tflops(run.device) * 1e12 * run.world_size
    imgs_per_step = cfg.batch_size_per_gpu * run.world_size

    stop.arm(len(loader), cfg.epochs)  # signals now stop at a step boundary
    from .compile import CompileMonitor  # graphs compiled / graph breaks per epoch (recompiles after the first)
    compiles = CompileMonitor()
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        logger.start_epoch(epoch)
        win, ep = _Window(run.device), _Window(run.device)
        timed = _timed(loader)
        for (crops, _), waited in timed:  # ============ data (wait timed: data_wait.py) ============
            # ============ forward → loss → backward → step → EMA ============
            try:
                loss = parts.train_step(st, crops, it, epoch)
            except torch.OutOfMemoryError as exc:
                raise _oom(cfg, run, exc) from exc
            except RuntimeError as exc:  # FSDP2's collectives inside the step: named (runtime/step_collectives.py)
                from dino_fast.runtime.step_collectives import step_collective_error
                named = step_collective_error(exc, it) if run.world_size > 1 else None
                if named is None:
                    raise
                raise named from exc
            # ============ log: device sums, read every log_interval steps ============
            win.add(loss, it, waited)
            it += 1
            logger.advance()
            if win.n == cfg.log_interval or ep.n + win.n == len(loader):
                values, dt = win.read(dino_loss, run.world_size, epoch, last_ckpt)   # the host sync
                win.wait += timed.take()                                             # device-side waits
                img_s = win.n * imgs_per_step / dt
                rec = {"epoch": epoch, "it": it, **values, "lr": float(schedules.lr[it - 1]),
                       "wd": float(schedules.wd[it - 1]), "momentum": float(schedules.momentum[it - 1]),
                       "img_s": img_s, "mfu": flops_img * img_s / peak, "data_time_frac": min(1.0, win.wait / dt),
                       "step_time_s": dt / win.n}
                logger.step(rec)
                _check_collapse(monitor, rec, cfg, dino_loss, run, it, last_ckpt, logger)
                if ibot_monitor is not None:
                    _check_collapse(ibot_monitor, parts.ibot_record(rec), cfg, dino_loss, run, it, last_ckpt, logger)
                ep.merge(win)
                win = _Window(run.device)
            if ep.n + win.n < len(loader):  # the epoch's last step: checked after its checkpoint
                stop.check(it, last_ckpt, window=win.n == 0)
        logger.end_epoch()
        compiles.log_epoch(epoch, first=epoch == start_epoch)
        # ============ epoch end: epoch record, checkpoint ============
        dt = time.perf_counter() - ep.t0
        rec = {"epoch": epoch, "it": it, "loss": float(ep.loss) / max(ep.n, 1), "lr": float(schedules.lr[it - 1]),
               "img_s": ep.n * imgs_per_step / dt, "data_time_frac": min(1.0, ep.wait / dt), "time_s": dt}
        logger.epoch(rec)  # before the checkpoint: a resume drops log records past its position
        summary["epochs"].append(rec)
        keep = bool(cfg.saveckp_freq) and epoch % cfg.saveckp_freq == 0
        last_ckpt = checkpoint.save(cfg.output_dir, st, epoch=epoch + 1, it=it, args=run_args,
                                    world_size=run.world_size, use_fsdp=run.use_fsdp, keep_copy=keep)
        log.info("epoch %d/%d: loss %.4f, %.1f img/s, checkpoint %s", epoch + 1, cfg.epochs, rec["loss"],
                 rec["img_s"], last_ckpt)
        stop.check(it, last_ckpt, window=True)
        if knn_monitor is not None and knn_monitor.due(epoch):  # every rank (sharded features); rank 0 logs
            logger.monitor(knn_monitor.evaluate(st.teacher, st.autocast, epoch=epoch, it=it))
    if knn:
        summary["knn_after"] = knn_top1(teacher.backbone, cfg.global_size, run.device, phase="after training")
    summary["warnings"] = logger.warnings
    summary["monitor"] = list(logger.monitors)
    summary["step_losses"] = list(logger.losses)
    return summary
