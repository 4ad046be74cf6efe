"""The training configuration: one typed dataclass, a docstring per field.

The first block mirrors every argument of the reference `main_dino.py` with
its default; the second holds dino-fast's own settings. `validate` turns bad
values into errors that name the argument and the fix, `save` writes the
resolved config next to the run. Presets (presets.py) build on this module;
the command-line flags (one per field) are made in dino_fast/commands/train.py.
"""
from __future__ import annotations

import ast
import inspect
import json
import os
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

from dino_fast.errors import ConfigError  # noqa: F401  (raised here; importable from here as before)
from dino_fast.model.registry import VIT_ARCHS

ARCHS = tuple(VIT_ARCHS)  # the ViTs; any torchvision / timm classification model name is a convnet
FFN_LAYERS = ("auto", "mlp", "swiglufused", "swiglu", "swiglu32", "swiglu64", "swiglu128")
POS_EMBEDS = ("learned", "rope")
POS_INTERPS = ("auto", "reference", "antialias", "size")
OPTIMIZERS = ("adamw", "sgd", "lars")
PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    # ---- the reference main_dino.py arguments (same names, same defaults) ----
    arch: str = "vit_small"
    """Backbone: a ViT (vit_tiny, vit_small, vit_base, vit_large, vit_so400m, vit_huge2, vit_giant2, vit_7b) or a convnet by torchvision / timm name (resnet50, convnext_small, timm:<name>)."""
    patch_size: int = 16
    """Patch size in pixels; smaller patches are more accurate and much slower."""
    out_dim: int = 65536
    """Output dimension K of the DINO head (65536 in the paper)."""
    norm_last_layer: bool = True
    """Weight-normalise the head's last layer with its norm fixed to 1 (more stable; False is better for ViT-S)."""
    momentum_teacher: float = 0.996
    """Base teacher EMA momentum, raised to 1 with a cosine schedule (use 0.9995 for batch 256)."""
    use_bn_in_head: bool = False
    """Batch norm in the projection head (off for ViTs)."""
    warmup_teacher_temp: float = 0.04
    """Initial teacher temperature."""
    teacher_temp: float = 0.04
    """Teacher temperature after its warm-up (paper long runs: 0.07)."""
    warmup_teacher_temp_epochs: int = 0
    """Epochs of linear teacher-temperature warm-up (reference default 0; paper: 30)."""
    use_fp16: bool = False
    """Reference flag: True is the same as --precision fp16 (fp16 autocast + grad scaler)."""
    weight_decay: float = 0.04
    """Initial weight decay (not applied to biases and norms)."""
    weight_decay_end: float = 0.4
    """Final weight decay of the cosine schedule."""
    clip_grad: float = 3.0
    """Maximal gradient norm per parameter tensor; 0 disables clipping."""
    batch_size_per_gpu: int = 64
    """Images per GPU (per process) per optimizer step."""
    epochs: int = 100
    """Number of training epochs."""
    freeze_last_layer: int = 1
    """Epochs during which the head's last layer is kept fixed."""
    lr: float = 0.0005
    """Peak learning rate for a total batch of 256; scaled linearly with the total batch."""
    warmup_epochs: int = 10
    """Epochs of linear learning-rate warm-up."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine schedule."""
    optimizer: str = "adamw"
    """Optimizer: adamw (ViTs), sgd or lars (convnets, large batches)."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate of the student."""
    global_crops_scale: tuple = (0.4, 1.0)
    """Area range (fraction of the image) of the 2 global crops."""
    local_crops_number: int = 8
    """Number of local crops (0 disables multi-crop; paper best: 10)."""
    local_crops_scale: tuple = (0.05, 0.4)
    """Area range (fraction of the image) of the local crops."""
    data_path: str = "demo"
    """Training images: an image folder, a flat folder, a .txt file list, tar shards, or 'demo' (built-in Fashion-MNIST)."""
    output_dir: str = "."
    """Folder for checkpoints, the JSON-lines log, the loss curve and the resolved config."""
    saveckp_freq: int = 20
    """Keep a copy checkpoint{epoch:04}.pth every this many epochs (0: only checkpoint.pth)."""
    seed: int = 0
    """Random seed."""
    num_workers: int = 10
    """Data-loading workers per process (torch pipeline)."""

    # ---- dino-fast's own settings ----
    preset: str = ""
    """Name of the preset this config started from (informational; set by --preset)."""
    precision: str = "bf16"
    """bf16 (FSDP param_dtype / autocast bf16, fp32 master weights), fp16 (autocast + grad scaler) or fp32. Autocast on one device and under FSDP2 alike, fp32 parameters. Reduced precision applies on CUDA devices; CPU runs fp32 (unless --cpu_autocast)."""
    attention: str = "auto"
    """Attention backend of the ViT: auto, xformers, flash, flex, sdpa or math."""
    loss_impl: str = "auto"
    """DINO loss implementation: auto, triton or torch."""
    ema_impl: str = "auto"
    """Teacher EMA implementation: auto, triton, foreach or loop (the reference's per-parameter loop)."""
    pipeline: str = "auto"
    """Data pipeline backend: auto, dali, torch or tensor (in-memory arrays such as the demo data, augmented in the training process)."""
    compile: bool | str = False
    """torch.compile: false, blocks (each transformer block of student and teacher: small graphs, no recompiles across crop sizes) or model (the whole student and teacher; true means model)."""
    activation_checkpointing: bool | str = False
    """Activation checkpointing per transformer block: false, full (recompute the block in the backward, ~30% more compute; true means full) or selective (keep matmul and attention outputs, recompute the element-wise ops)."""
    log_interval: int = 10
    """Optimizer steps between log records (the only host syncs of the loop)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step: batch_size_per_gpu is split into this many; EMA, centre and schedules advance once per step."""
    dist_timeout: int = 30
    """Minutes a collective may wait before the run fails with an error instead of hanging."""
    stop_on_collapse: bool = False
    """Stop cleanly (naming the last good checkpoint) when the collapse monitor fires, instead of only warning."""
    collapse_patience: int = 5
    """Consecutive logging steps of collapsed teacher entropy before the collapse warning fires."""
    dry_run: bool = False
    """Build the model, print the memory plan and exit without training."""
    gpu_memory: float = 0.0
    """GPU memory in GB for the --dry_run plan (0: the visible GPU's, else 80)."""
    global_size: int = 224
    """Side in pixels of the global crops."""
    local_size: int = 96
    """Side in pixels of the local crops."""
    device: str = "auto"
    """auto (the local CUDA device, else CPU), cuda or cpu."""
    depth: int = 0
    """Transformer blocks of the backbone (0: the architecture's own; the demo uses fewer)."""
    num_register_tokens: int = 0
    """Register (DINOv2) / storage (DINOv3) tokens after CLS in every crop's row (0: none; DINOv2/v3 use 4)."""
    layerscale_init: float = 0.0
    """LayerScale on both residual branches of every block, gamma initialised to this (0: none; DINOv2/v3: 1e-5)."""
    ffn_layer: str = "auto"
    """Feed-forward layer: mlp, swiglufused (DINOv2 ViT-g: w12/w3), swiglu / swiglu32 / swiglu64 / swiglu128 (DINOv3: w1/w2/w3, hidden aligned); auto: the architecture's (swiglufused for vit_giant2, swiglu64 for vit_7b, else mlp)."""
    qkv_bias: bool = True
    """Bias on the qkv projection (the reference and DINOv2: on; DINOv3 7B: off). With RoPE its k third is held at 0, as DINOv3."""
    pos_embed: str = "learned"
    """Position embedding: learned (absolute, resized per crop size) or rope (DINOv3 rotary embedding on q/k, each crop on its own patch grid)."""
    pos_interp: str = "auto"
    """How a learned position embedding is resized to other crop sizes: reference (bicubic, scale (grid+0.1)/side), antialias (exact size, antialiased: DINOv2 with registers, timm), size (exact size); auto: antialias with registers, else reference."""
    rope_base: float = 100.0
    """RoPE period base (DINOv3: 100); ignored when rope_min_period and rope_max_period are both set."""
    rope_min_period: float = 0.0
    """RoPE smallest period, with rope_max_period instead of rope_base (0: use rope_base)."""
    rope_max_period: float = 0.0
    """RoPE largest period, with rope_min_period instead of rope_base (0: use rope_base)."""
    rope_normalize_coords: str = "separate"
    """RoPE patch coordinates in [-1, 1] normalised by each side (separate), the longer (max) or the shorter (min) side."""
    rope_shift_coords: float = 0.0
    """Student RoPE training augmentation: shift the coordinates by U(-s, s) per axis (0: off)."""
    rope_jitter_coords: float = 0.0
    """Student RoPE training augmentation: scale each axis by a log-uniform factor in [1/J, J] (0: off)."""
    rope_rescale_coords: float = 0.0
    """Student RoPE training augmentation: scale both axes by one log-uniform factor in [1/R, R] (0: off; DINOv3: 2)."""
    norm_eps: float = 0.0
    """LayerNorm epsilon (0: 1e-5 with RoPE as DINOv3, else 1e-6 as the reference and DINOv2)."""
    untie_global_and_local_cls_norm: bool = False
    """A separate final norm for the local crops' CLS and register tokens during training (DINOv3's untie_global_and_local_cls_norm)."""
    mask_token: bool = False
    """Give the ViT a learned mask token for masked-image modelling (the DINOv2 method's iBOT student)."""
    init_from: str = ""
    """Start student and teacher from this backbone (continued pretraining): any file dino_fast.load reads (dino-fast / reference / DINOv2 / DINOv3 checkpoints, timm state dicts, exports). Its architecture replaces arch and the model fields; its heads are loaded when it has them and they fit."""
    init_from_key: str = "teacher"
    """Which network of an --init_from training checkpoint: teacher or student."""
    head_hidden_dim: int = 2048
    """Hidden width of the DINO head MLP."""
    head_bottleneck_dim: int = 256
    """Bottleneck width of the DINO head before the last layer."""
    fsdp: str = "auto"
    """Shard with FSDP2: auto (when running with more than one process), on, off."""
    resume: bool = True
    """Continue from output_dir/checkpoint.pth (or the sharded checkpoint/) when one exists, as the reference does."""
    max_images: int = 0
    """Use only the first N images of the data (0: all); for quick tries."""
    knn_eval: bool = True
    """For the demo data: print the teacher's weighted 20-NN accuracy before and after training."""
    monitor_knn: str = ""
    """Labelled ImageFolder with train/ and val/ (a small one): the teacher's weighted 20-NN top-1/top-5 on it every --monitor_every epochs, in log.jsonl and loss_curve.png ('' = off)."""
    monitor_every: int = 1
    """Epochs between two --monitor_knn evaluations (the last epoch is always evaluated)."""

    # ---- resume: resume validation and interruptions ----
    extend_epochs: bool = False
    """Resume a run with more --epochs than it was started with: the schedules are rebuilt for the new epoch count (as if planned that long) and training continues at the iteration reached."""

    # ---- gpupath: the GPU's mixed precision on the CPU (tests of the default GPU path) ----
    cpu_autocast: bool = False
    """Apply --precision bf16/fp16 on the CPU too (CPU autocast, as CUDA runs; slow): the GPU path's numerics on a machine without one, for tests."""

    # ---- dinov2train: the DINOv2 / DINOv3 method (dino_fast/dinov2/; used with --method dinov2) ----
    method: str = "dino"
    """Training objective: dino (the reference DINO) or dinov2 (DINO on CLS + iBOT on masked patches + KoLeo, DINOv2 / DINOv3; the ViT gets a mask token)."""
    centering: str = "softmax"
    """dinov2: teacher probabilities of both heads by softmax centring (EMA centre, DINOv2's 'centering') or sinkhorn_knopp (3 iterations, log domain)."""
    dino_loss_weight: float = 1.0
    """dinov2: weight of the DINO CLS-token loss (DINOv2: 1.0)."""
    ibot_loss_weight: float = 1.0
    """dinov2: weight of the iBOT masked-patch loss (DINOv2: 1.0; 0 disables masking)."""
    koleo_loss_weight: float = 0.1
    """dinov2: weight of the KoLeo regulariser on the student's global-crop CLS features (DINOv2: 0.1)."""
    ibot_separate_head: bool = False
    """dinov2: a separate iBOT head (DINOv2 ibot.separate_head; ViT-L/14 and DINOv3: true); false: the DINO head also runs on the masked patch tokens."""
    ibot_out_dim: int = 65536
    """dinov2: prototypes of the separate iBOT head (DINOv2 ibot.head_n_prototypes)."""
    ibot_head_hidden_dim: int = 2048
    """dinov2: hidden width of the separate iBOT head."""
    ibot_head_bottleneck_dim: int = 256
    """dinov2: bottleneck width of the separate iBOT head."""
    mask_ratio_min_max: tuple = (0.1, 0.5)
    """dinov2: range of the share of an image's patches that are masked (DINOv2 ibot.mask_ratio_min_max)."""
    mask_sample_probability: float = 0.5
    """dinov2: share of the global-crop images of a batch that get a mask (DINOv2 ibot.mask_sample_probability)."""
    layerwise_decay: float = 1.0
    """dinov2: layer-wise lr decay: block i gets lr * decay^(depth - i), patch embedding / tokens decay^(depth + 1) (DINOv2 ViT-L/16: 0.9; 1: off)."""
    patch_embed_lr_mult: float = 1.0
    """dinov2: extra lr multiplier of the patch embedding (DINOv2: 0.2)."""
    lr_scaling: str = "linear_wrt_256"
    """How --lr scales with the total batch: linear_wrt_256 (lr * batch / 256, the DINO reference) or sqrt_wrt_1024 (lr * sqrt(batch / 1024), DINOv2 / DINOv3)."""
    drop_path_uniform: bool = False
    """dinov2: the same stochastic-depth rate in every block (DINOv2 drop_path_uniform) instead of the linear rule."""
    gram_loss_weight: float = 0.0
    """dinov2: weight of DINOv3's Gram anchoring loss after its schedule (0: off; DINOv3 7B: 2.0)."""
    gram_weight_warmup_epochs: int = 0
    """dinov2: epochs with Gram weight 0 before its ramp (DINOv3 loss_weight_schedule warmup with start = peak = 0)."""
    gram_weight_ramp_epochs: int = 0
    """dinov2: epochs of the half-cosine ramp of the Gram weight from 0 to --gram_loss_weight (0: a step)."""
    gram_it_first_update: int = 0
    """dinov2: iteration at which the Gram teacher is first copied from the EMA teacher; the Gram loss runs from then on."""
    gram_update_frequency: int = 10000
    """dinov2: iterations between two refreshes of the frozen Gram teacher from the EMA teacher (DINOv3 7B: 10000)."""
    gram_max_updates: int = 0
    """dinov2: most refreshes of the Gram teacher after the first copy (0: unlimited; DINOv3 7B: 3)."""
    gram_teacher_size: int = 0
    """dinov2: side in pixels of the Gram teacher's view of the global crops (bicubic upsampling; 0: the global size; DINOv3 7B: 2x); its patch features are resized (bicubic) to the student's grid."""
    gram_img_level: bool = True
    """dinov2: Gram matrices per image (DINOv3 7B config) instead of over all patches of the local batch."""

    # ---- stepspeed: step speed options (step_options.py) ----
    fused_optimizer: bool = False
    """AdamW with fused=True (one kernel for all parameters of a group) where the device supports it (CUDA, CPU)."""
    efficient_drop_path: bool = False
    """Stochastic depth that runs each residual branch only on the kept rows (crop x image) and scatters it back (DINOv2/DINOv3), instead of zeroing a computed branch."""
    cuda_graph_teacher: bool = False
    """Compile the teacher's transformer blocks with CUDA graphs (static shapes; CUDA only)."""


@lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """Field name -> its docstring (read from this file's source)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _check_scale(name: str, value) -> tuple:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} needs two numbers 'min max' (e.g. 0.4 1.0), got {value!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise ConfigError(f"--{name} {lo} {hi}: the crop area range must satisfy 0 < min <= max <= 1 "
                          f"(fractions of the image area, e.g. --{name} 0.4 1.0)")
    return (lo, hi)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field; returns cfg with derived fields settled (use_fp16 -> precision)."""
    def choice(name, options):
        if getattr(cfg, name) not in options:
            raise ConfigError(f"--{name} {getattr(cfg, name)!r} is not one of: {', '.join(options)}")
    _check_arch(cfg.arch)
    choice("ffn_layer", FFN_LAYERS)
    choice("pos_embed", POS_EMBEDS)
    choice("pos_interp", POS_INTERPS)
    choice("rope_normalize_coords", ("separate", "min", "max"))
    choice("init_from_key", ("teacher", "student"))
    choice("optimizer", OPTIMIZERS)
    choice("precision", PRECISIONS)
    choice("fsdp", ("auto", "on", "off"))
    choice("device", ("auto", "cuda", "cpu"))
    if cfg.use_fp16:
        cfg.precision = "fp16"
    try:
        from .step_options import normalize
        normalize(cfg)   # --compile / --activation_checkpointing: bool or mode word -> mode
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg.global_crops_scale = _check_scale("global_crops_scale", cfg.global_crops_scale)
    cfg.local_crops_scale = _check_scale("local_crops_scale", cfg.local_crops_scale)
    positive = ("patch_size", "out_dim", "batch_size_per_gpu", "epochs", "log_interval", "grad_accum_steps",
                "global_size", "local_size", "dist_timeout", "head_hidden_dim", "head_bottleneck_dim")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("local_crops_number", "warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer",
                 "saveckp_freq", "num_workers", "depth", "max_images", "num_register_tokens", "layerscale_init",
                 "rope_min_period", "rope_max_period", "rope_shift_coords", "norm_eps"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.fused_optimizer and cfg.optimizer != "adamw":
        raise ConfigError(f"--fused_optimizer is for adamw, not --optimizer {cfg.optimizer}: use --optimizer adamw "
                          "or --fused_optimizer false")
    if cfg.batch_size_per_gpu % cfg.grad_accum_steps:
        raise ConfigError(f"--batch_size_per_gpu {cfg.batch_size_per_gpu} is not divisible by --grad_accum_steps "
                          f"{cfg.grad_accum_steps}: each micro-batch holds batch_size_per_gpu / grad_accum_steps images")
    if cfg.warmup_epochs > cfg.epochs or cfg.warmup_teacher_temp_epochs > cfg.epochs:
        raise ConfigError(f"--warmup_epochs ({cfg.warmup_epochs}) and --warmup_teacher_temp_epochs "
                          f"({cfg.warmup_teacher_temp_epochs}) cannot exceed --epochs ({cfg.epochs})")
    for name in ("rope_jitter_coords", "rope_rescale_coords"):
        if getattr(cfg, name) and getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: a log-uniform range [1/x, x] needs x >= 1 (0: off)")
    if bool(cfg.rope_min_period) != bool(cfg.rope_max_period):
        raise ConfigError("--rope_min_period and --rope_max_period go together (both 0: use --rope_base)")
    if cfg.pos_embed == "rope" and _is_vit(cfg.arch):
        from dino_fast.model.registry import vit_arch
        a = vit_arch(cfg.arch)
        if (a.embed_dim // a.num_heads) % 4:
            raise ConfigError(f"--pos_embed rope needs a head dim divisible by 4; {cfg.arch} has "
                              f"{a.embed_dim // a.num_heads}")
    if cfg.init_from and not os.path.exists(cfg.init_from):
        raise ConfigError(f"--init_from {cfg.init_from!r} does not exist: give a checkpoint or exported backbone file")
    if _is_vit(cfg.arch) and not cfg.init_from and min(cfg.global_size, cfg.local_size) < cfg.patch_size:
        raise ConfigError(f"crops of {min(cfg.global_size, cfg.local_size)} px are smaller than one patch "
                          f"({cfg.patch_size} px): raise --local_size/--global_size or lower --patch_size")
    if cfg.data_path != "demo" and not any(c in cfg.data_path for c in "*?[") and not os.path.exists(cfg.data_path):
        raise ConfigError(f"--data_path {cfg.data_path!r} does not exist: point it at a folder of images "
                          "(ImageFolder or flat), a .txt file list, or webdataset .tar shards; "
                          "or use --data_path demo for the built-in demo images")
    from dino_fast.dinov2.train_config import validate_dinov2
    validate_dinov2(cfg)
    if cfg.monitor_every < 1:
        raise ConfigError(f"--monitor_every must be >= 1 (epochs between two k-NN evaluations), got {cfg.monitor_every}")
    if cfg.monitor_knn and not all(os.path.isdir(os.path.join(cfg.monitor_knn, d)) for d in ("train", "val")):
        raise ConfigError(f"--monitor_knn {cfg.monitor_knn!r}: needs train/ and val/ ImageFolders (one subfolder "
                          "per class) inside; a few thousand labelled images keep each evaluation short")
    from .backend_check import backend_problem  # userdata: backend names are one-line errors too
    if (problem := backend_problem(cfg)) is not None:
        raise ConfigError(problem)
    return cfg


def _is_vit(arch: str) -> bool:
    return arch in ARCHS


def _check_arch(arch: str) -> None:
    """A ViT of the registry or a torchvision / timm convnet name."""
    if _is_vit(arch):
        return
    from dino_fast.model.convnet import resolve_convnet
    try:
        resolve_convnet(arch)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["global_crops_scale"], d["local_crops_scale"] = list(cfg.global_crops_scale), list(cfg.local_crops_scale)
    d["mask_ratio_min_max"] = list(cfg.mask_ratio_min_max)
    return d


def from_dict(d: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; valid keys are the fields of TrainConfig")
    d = dict(d)
    for k in ("global_crops_scale", "local_crops_scale", "mask_ratio_min_max"):
        if k in d:
            d[k] = tuple(d[k])
    return TrainConfig(**d)


def save(cfg: TrainConfig, output_dir: str) -> str:
    """Write the resolved config as `config.json` in output_dir (atomically)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "config.json")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(to_dict(cfg), f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path
