"""Memory plan of a DINO training step, per GPU: will this run fit, and what to change if not.

`memory_plan(...)` counts, from the architecture alone (no model is built):

- parameters of student and teacher (ViT + DINO head, the reference's layout;
  a test checks the count against `sum(p.numel())` of dino_fast.model);
- state bytes per GPU: fp32 master weights, fp32 gradients, optimizer state
  (AdamW 2 x fp32, SGD/LARS 1 x fp32 momentum), the fp32 teacher, and the
  compute copies - under FSDP2 all four are sharded 1/world_size, plus the
  all-gathered fp32 copies of the root group (embeddings, final norm, head) and
  of two blocks (current + prefetched) and their unsharded gradients in flight;
  with autocast (one device and FSDP2 alike: dino_fast/train/precision.py), a
  bf16 copy of every student weight (autocast's weight cache lives from the
  forward to the backward);
- activation bytes per image for every crop size, with and without activation
  checkpointing, and the head / logits / loss bytes per image;
- the largest micro-batch that fits `gpu_memory` GiB minus a safety margin.

Activation model (saved-for-backward tensors of one pre-norm ViT block, per token,
D = width, H = heads, a = compute bytes (2 bf16/fp16, 4 fp32), r = residual-stream
bytes (4: autocast runs LayerNorm and the residual adds in fp32, on one device and
under FSDP2 alike)):
    LN1 input r·D, LN1 output (qkv input) a·D, qkv a·3D, attention output a·D,
    LN2 input r·D, LN2 output (fc1 input) a·D, GELU input a·4D, GELU output (fc2 input) a·4D,
    LayerNorm mean/rstd 4·4 bytes,
    + memory-efficient attention (flash / xformers / cuDNN / flex, no L x L matrix): the
      log-sum-exp H·4 bytes; dino_fast's per-group "sdpa" path saves one more a·D (the
      groups' outputs are concatenated before the projection);
    + math attention: the softmax probabilities H·L per token (a bytes, plus a 4-byte fp32
      copy under autocast, which runs softmax in fp32).
  = (2r + 14a)·D (+ a·D for sdpa) per token: 36·D bytes with autocast bf16.
  Activation checkpointing keeps only each block's input (r·D per token) and recomputes one
  block at a time in the backward (one block's activations for the whole micro-batch).
  Selective checkpointing (dino_fast.model.checkpointing) keeps the block input r·D and the
  outputs of the matmuls and attention kernels: qkv a·3D, attention output a·D (+ the
  log-sum-exp H·4; math attention: the scores a·H·L and attn @ v a·D), proj a·D, the FFN's
  matmul outputs (MLP: fc1 a·Hm and fc2 a·D; SwiGLU: a·2H' and a·D); the element-wise rest
  (LayerNorm outputs, GELU / SiLU, LayerScale, RoPE) is recomputed one block at a time:
  r·D + 10a·D + 4H = 24·D + 4H bytes per token for the ViT MLP in bf16 with fp32 residuals.
  Per crop-image also: the patch-embedding input 3·S²·a and the final norm + head MLP
  activations (small). Backward working set: the gradients of the largest layer (a·8D per
  token, + the L x L probability gradients for math attention).
Head / loss per image (K = out_dim): the fused loss (dino_fast.kernels.dino_loss) keeps the
  student and teacher logits (a bytes each) and writes the logits' gradient (a bytes) in the
  backward; the reference loss keeps an fp32 log-softmax per (teacher, student) pair and the
  fp32 teacher probabilities. Not counted: the CUDA context, cuBLAS/NCCL workspaces and
  allocator fragmentation - the safety margin (10 % + 1 GiB by default) is for those.
`oom_error(exc, plan)` turns a CUDA out-of-memory error in a step into a message with these
numbers and the three remedies with concrete values.

Every backbone dino-fast builds is planned from the model itself, built on the meta device
(dino_fast.model.shape; `backbone=` or memory_plan_from_config): exact parameter counts, and for a
ViT L = 1 + registers + patches tokens, the FFN's saved activations (MLP: GELU input and output,
a·2Hm; SwiGLU: gate, value, silu(gate) and their product, a·4H'), a·D per LayerScale (its input is
saved for the gamma gradient), and with RoPE the fp32 cos/sin tables (2·4·head_dim per token, once
per forward, per block with the coordinate augmentations on). A convnet's activations are what
autograd saves for it on the meta device (fp32, scaled by a/4 for bf16/fp16; no checkpointing).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

GiB = 1024 ** 3
MiB = 1024 ** 2

# name -> (width, heads); depth 12 and MLP ratio 4 for all (the reference's vit_* factories)
ARCHS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4, "lars": 4}
DEFAULT_GPU_GIB = 80.0
FUSED_LOSS = ("auto", "triton", "fused")


def checkpoint_mode(value) -> bool | str:
    """False | "full" | "selective" (dino_fast.model.checkpointing.checkpoint_mode)."""
    from dino_fast.model.checkpointing import checkpoint_mode as mode
    return mode(value)


# ----------------------------------------------------------------------------- parameter counts
def vit_param_count(arch: str, patch_size: int, depth: int = 12, img_size: int = 224) -> int:
    """Parameters of the reference ViT backbone (no classifier): patch conv, CLS, positions
    (sized for img_size), `depth` blocks of 12·D² + 13·D, final LayerNorm."""
    d, _ = _arch(arch)
    n_patches = (img_size // patch_size) ** 2
    patch = 3 * patch_size * patch_size * d + d
    block = (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return patch + d + (n_patches + 1) * d + depth * block + 2 * d


def head_param_count(in_dim: int, out_dim: int, use_bn: bool = False, nlayers: int = 3, hidden_dim: int = 2048,
                     bottleneck_dim: int = 256) -> tuple[int, int]:
    """(total, trainable with norm_last_layer) parameters of the DINO head. The last layer is
    weight-normalised: weight_v (K, bottleneck) + weight_g (K, 1); weight_g is frozen when
    norm_last_layer, so `trainable = total - K` then."""
    nlayers = max(nlayers, 1)
    if nlayers == 1:
        mlp = in_dim * bottleneck_dim + bottleneck_dim
    else:
        mlp = in_dim * hidden_dim + hidden_dim
        mlp += (nlayers - 2) * (hidden_dim * hidden_dim + hidden_dim)
        mlp += hidden_dim * bottleneck_dim + bottleneck_dim
        if use_bn:
            mlp += (nlayers - 1) * 2 * hidden_dim
    last = out_dim * bottleneck_dim + out_dim
    total = mlp + last
    return total, total - out_dim


def _arch(arch: str) -> tuple[int, int]:
    if arch not in ARCHS:
        raise ValueError(f"memory plan: unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan depends on (see `memory_plan` for the meaning)."""
    arch: str = "vit_small"
    patch_size: int = 16
    out_dim: int = 65536
    batch_size_per_gpu: int = 64
    world_size: int = 1
    precision: str = "bf16"
    sharded: bool = False
    activation_checkpointing: bool | str = False   # False | "full" | "selective" (True: full)
    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    grad_accum_steps: int = 1
    depth: int = 12
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    optimizer: str = "adamw"
    attention: str = "auto"
    loss_impl: str = "auto"
    img_size: int = 224
    gpu_memory_gib: float = DEFAULT_GPU_GIB
    gpu_name: str = "assumed"
    safety_frac: float = 0.10
    reserved_gib: float = 1.0
    input_batches_in_flight: int = 2
    shape: object = None          # dino_fast.model.shape.BackboneShape; None: the reference ViT of `arch`
    efficient_drop_path_rate: float = 0.0   # the student's drop path rate with --efficient_drop_path, else 0


@dataclass(frozen=True)
class CropActivations:
    """Activation bytes of ONE crop of one image through the student."""
    kind: str            # "global" | "local"
    size: int            # side in pixels
    tokens: int          # 1 + (size/p)^2
    count: int           # crops of this kind per image
    saved: int           # bytes saved for backward, no checkpointing
    saved_ckpt: int      # bytes saved for backward with activation checkpointing
    block: int           # bytes of one block's saved activations (the recompute under checkpointing)
    transient: int       # backward working set of one block
    saved_selective: int = 0   # bytes saved for backward with selective checkpointing
    block_selective: int = 0   # one block's recomputed element-wise activations under selective


@dataclass(frozen=True)
class MemoryPlan:
    inputs: PlanInputs
    params_student: int
    params_teacher: int
    params_trainable: int
    params_backbone: int
    params_head: int
    state: dict = field(default_factory=dict)     # name -> bytes per GPU
    crops: tuple = ()                            # CropActivations per crop kind
    head_per_image: int = 0                      # final norm (CLS rows) + head MLP activations, all crops
    loss_per_image: int = 0                      # student/teacher logits + loss buffers + logits gradient
    input_per_image: int = 0                     # the crops themselves (fp32), times batches in flight
    fixed_bytes: int = 0                         # per step, independent of the batch (last-layer weight)
    micro_batch: int = 0
    gpu_memory_bytes: int = 0
    usable_bytes: int = 0

    # -- derived -----------------------------------------------------------------------------
    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    def _mode(self, checkpointing) -> bool | str:
        return checkpoint_mode(self.inputs.activation_checkpointing if checkpointing is None else checkpointing)

    def activations_per_image(self, checkpointing: bool | str | None = None) -> int:
        """Backbone activation bytes saved per image (all crops), without the backward transient.
        checkpointing: False, True / "full", "selective" (None: the plan's)."""
        mode = self._mode(checkpointing)
        return sum(c.count * {False: c.saved, "full": c.saved_ckpt, "selective": c.saved_selective}[mode]
                   for c in self.crops)

    def per_image_bytes(self, checkpointing: bool | str | None = None) -> int:
        """Everything that grows with the micro-batch, per image."""
        mode = self._mode(checkpointing)
        recompute = {False: lambda c: 0, "full": lambda c: c.block, "selective": lambda c: c.block_selective}[mode]
        extra = sum(c.count * (c.transient + recompute(c)) for c in self.crops)
        return self.activations_per_image(mode) + extra + self.head_loss_per_image + self.input_per_image

    @property
    def head_loss_per_image(self) -> int:
        return self.head_per_image + self.loss_per_image

    def peak_bytes(self, micro_batch: int | None = None, checkpointing: bool | str | None = None) -> int:
        b = self.micro_batch if micro_batch is None else micro_batch
        return self.state_bytes + self.fixed_bytes + b * self.per_image_bytes(checkpointing)

    @property
    def estimated_peak_bytes(self) -> int:
        return self.peak_bytes()

    def max_micro_batch(self, checkpointing: bool | str | None = None) -> int:
        """Largest micro-batch (images per GPU per forward) whose estimated peak fits the usable memory."""
        room = self.usable_bytes - self.state_bytes - self.fixed_bytes
        return max(0, room // self.per_image_bytes(checkpointing))

    @property
    def fits(self) -> bool:
        return self.estimated_peak_bytes <= self.usable_bytes


def visible_gpu_memory() -> tuple[float, str] | None:
    """(GiB, name) of the current CUDA device, or None without one."""
    import torch
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.total_memory / GiB, props.name


def memory_plan(arch: str = "vit_small", patch_size: int = 16, out_dim: int = 65536, *,
                batch_size_per_gpu: int = 64, world_size: int = 1, precision: str = "bf16",
                sharded: bool = False, activation_checkpointing: bool | str = False, global_size: int = 224,
                local_size: int = 96, n_global: int = 2, n_local: int = 8, grad_accum_steps: int = 1,
                depth: int = 0, use_bn_in_head: bool = False, norm_last_layer: bool = True,
                head_hidden_dim: int = 2048, head_bottleneck_dim: int = 256, head_nlayers: int = 3,
                optimizer: str = "adamw", attention: str = "auto", loss_impl: str = "auto",
                img_size: int = 224, gpu_memory: float | None = None, safety_frac: float = 0.10,
                reserved_gib: float = 1.0, input_batches_in_flight: int = 2, backbone=None,
                efficient_drop_path_rate: float = 0.0) -> MemoryPlan:
    """Estimate the per-GPU memory of a DINO training step (see the module docstring).

    Args (names as the training config's fields):
        arch, patch_size, depth (0: 12), out_dim, head_*: the networks (student = teacher).
        batch_size_per_gpu, grad_accum_steps: images per GPU per optimizer step, and the number
            of micro-batches it is split into (activations scale with the micro-batch).
        world_size, sharded: FSDP2 over world_size ranks (sharded=True) or replicated.
        precision: "bf16" | "fp16" | "fp32" (GPU compute precision; master weights are fp32).
        activation_checkpointing: False; True / "full" (recompute each student block in the backward);
            "selective" (keep matmul and attention outputs, recompute the element-wise ops).
        global_size, local_size, n_global, n_local: the multi-crop setting.
        optimizer: adamw | sgd | lars.   attention: auto | sdpa | xformers | flash | flex | math.
        loss_impl: auto | triton (fused loss) | torch | reference (materialised reference loss).
        gpu_memory: GiB of the GPU (None or 0: the visible GPU's, else 80).
        safety_frac, reserved_gib: usable = gpu_memory·(1 - safety_frac) - reserved_gib.
        input_batches_in_flight: micro-batches of crops on the GPU at once (current + prefetched).
        backbone: the student backbone (a meta-device build is enough) for any architecture other
            than the reference ViTs (registers, SwiGLU, RoPE, large ViTs, convnets); an arch of
            dino_fast.model.registry with patch_size / depth is built on the meta device here.
        efficient_drop_path_rate: with --efficient_drop_path, the drop path rate: block i (rate
            p_i = rate * i / (depth - 1)) keeps the activations of a (1 - p_i) share of the rows
            only, plus the int64 token index of each branch (0: off).
    """
    shape = None
    if backbone is None and arch not in ARCHS:
        from dino_fast.model.registry import is_vit
        if not is_vit(arch):
            _arch(arch)               # unknown arch -> a clear error before anything else
        import torch
        from dino_fast.model.registry import build_vit
        with torch.device("meta"):
            backbone = build_vit(arch, patch_size, **({"depth": depth} if depth else {}))
    if backbone is not None:
        from dino_fast.model.shape import backbone_shape
        shape = backbone_shape(backbone)
        arch, patch_size, depth = shape.arch, shape.patch_size, shape.units
    else:
        _arch(arch)
    depth = depth or 12
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"memory plan: precision {precision!r} is not bf16, fp16 or fp32")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"memory plan: optimizer {optimizer!r} is not one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if batch_size_per_gpu < 1 or grad_accum_steps < 1 or world_size < 1:
        raise ValueError("memory plan: batch_size_per_gpu, grad_accum_steps and world_size must be >= 1")
    if gpu_memory:
        gpu_gib, gpu_name = float(gpu_memory), "given"
    else:
        found = visible_gpu_memory()
        gpu_gib, gpu_name = found if found else (DEFAULT_GPU_GIB, "assumed (no GPU visible)")
    inputs = PlanInputs(arch, patch_size, out_dim, batch_size_per_gpu, world_size, precision, bool(sharded),
                        checkpoint_mode(activation_checkpointing), global_size, local_size, n_global, n_local,
                        grad_accum_steps, depth, use_bn_in_head, norm_last_layer, head_hidden_dim,
                        head_bottleneck_dim, head_nlayers, optimizer, attention, loss_impl, img_size,
                        gpu_gib, gpu_name, safety_frac, reserved_gib, input_batches_in_flight, shape,
                        float(efficient_drop_path_rate))
    return _plan(inputs)


def replan(plan: MemoryPlan, **changes) -> MemoryPlan:
    """The same plan with some inputs changed (e.g. activation_checkpointing=True)."""
    return _plan(dataclasses.replace(plan.inputs, **changes))


def _plan(x: PlanInputs) -> MemoryPlan:
    sh = x.shape
    if sh is None:  # the reference ViT of the table
        d, heads = _arch(x.arch)
        backbone = backbone_trainable = vit_param_count(x.arch, x.patch_size, x.depth, x.img_size)
        p_block, units, prefix, ffn_saved, ls, rope_rows = 12 * d * d + 13 * d, x.depth, 1, 8 * d, False, 0
    else:
        d, heads, backbone, backbone_trainable = sh.embed_dim, sh.heads, sh.params, sh.params_trainable
        p_block, units, prefix, ffn_saved, ls = sh.params_block, sh.units, sh.prefix, sh.ffn_saved, sh.layerscale
        rope_rows = (sh.units if sh.rope_per_block else 1) if sh.rope else 0   # fp32 cos/sin table sets
    head_total, head_trainable = head_param_count(d, x.out_dim, x.use_bn_in_head, x.head_nlayers,
                                                  x.head_hidden_dim, x.head_bottleneck_dim)
    p_student = backbone + head_total
    p_trainable = backbone_trainable + (head_trainable if x.norm_last_layer else head_total)
    p_root = p_student - units * p_block          # embeddings + final norm + head: FSDP2's root group

    low = x.precision in ("bf16", "fp16")
    autocast = low                                     # one device and FSDP2 alike (train/precision.py)
    a = 2 if low else 4
    r = 4                                              # fp32 residual stream
    w = x.world_size if x.sharded else 1

    # ---- state per GPU -------------------------------------------------------------------
    state = {
        "student weights (fp32)": 4 * p_student // w,
        "student gradients (fp32)": 4 * p_trainable // w,
        f"{x.optimizer} state": OPTIMIZER_STATE_BYTES[x.optimizer] * p_trainable // w,
        "teacher weights (fp32)": 4 * p_student // w,
    }
    if x.sharded:
        gathered = 4                                   # FSDP2 all-gathers the fp32 parameters
        # root group unsharded through forward+backward (student; teacher during its forward),
        # two blocks gathered at a time (current + prefetch), their unsharded grads + fp32 reduce copies
        state["FSDP2 all-gathered weights"] = gathered * (2 * p_root + 2 * p_block)
        state["FSDP2 unsharded gradients in flight"] = gathered * p_root + 2 * (gathered + 4) * p_block
        if x.grad_accum_steps > 1:
            state["unsharded gradients kept across micro-batches (no-sync)"] = 4 * p_trainable
    if autocast:
        state["autocast bf16/fp16 weight copies"] = 2 * p_student

    # ---- activations per crop -----------------------------------------------------------
    attn = x.attention if x.attention != "auto" else "sdpa"
    n_out = 2 if (attn == "sdpa" and x.n_local > 0 and x.n_global > 0) else 1
    # efficient drop path: block i runs its branches on a (1 - p_i) share of the rows (drop_path.py)
    rate = x.efficient_drop_path_rate if sh is None or sh.kind != "convnet" else 0.0
    rates = [rate * i / (units - 1) if units > 1 else 0.0 for i in range(units)]
    kept_blocks = sum(1.0 - p for p in rates)                  # blocks' worth of full activations
    index_token = sum(16 * (1.0 - p) for p in rates if p > 0)   # two int64 token indices per dropping block
    crops = []
    for kind, size, count in (("global", x.global_size, x.n_global), ("local", x.local_size, x.n_local)):
        if count == 0:
            continue
        if sh is not None and sh.kind == "convnet":
            from dino_fast.model.shape import convnet_saved_bytes
            saved, largest = convnet_saved_bytes(sh.arch, size)
            saved, largest = saved * a // 4, largest * a // 4
            crops.append(CropActivations(kind, size, 0, count, saved=saved, saved_ckpt=saved, block=0,
                                         transient=2 * largest))
            continue
        tokens = (size // x.patch_size) ** 2 + prefix
        # LN inputs (r), LN outputs + qkv + attention output(s) (a), the FFN, LayerScale inputs, LN stats
        per_token = (2 * r + (5 + n_out) * a) * d + ffn_saved * a + (2 * a * d if ls else 0) + 16
        transient_token = ffn_saved * a
        if attn == "math":
            per_token += heads * tokens * (a + (4 if autocast else 0))
            transient_token += 2 * heads * tokens * a
        else:
            per_token += heads * 4
        block = tokens * per_token
        # selective: block input, qkv, attention output (+ lse, or the math scores), proj, FFN matmul outputs
        attn_kept = heads * tokens * a + a * d if attn == "math" else a * d + heads * 4
        sel_token = r * d + 5 * a * d + attn_kept + (ffn_saved // 2) * a
        embed = 3 * size * size * a + rope_rows * tokens * 8 * (d // heads)   # + RoPE cos/sin tables (fp32)
        crops.append(CropActivations(
            kind, size, tokens, count,
            saved=int(kept_blocks * block + tokens * index_token) + embed,
            saved_ckpt=units * tokens * d * r + embed,
            block=block, transient=tokens * transient_token,
            saved_selective=int(tokens * (units * r * d + kept_blocks * (sel_token - r * d))) + embed,
            block_selective=tokens * max(0, per_token - sel_token + r * d)))

    # ---- head, logits and loss per image --------------------------------------------------
    ncrops = x.n_global + x.n_local
    hb, bb, k = x.head_hidden_dim, x.head_bottleneck_dim, x.out_dim
    # per crop row: final LayerNorm input (CLS token only) + its stats, then the head MLP:
    # fc1 input, per hidden layer GELU input and the next linear's input, normalize + last-layer inputs
    head_row = d * r + 8 + (d + 2 * (x.head_nlayers - 1) * hb + 2 * bb) * a
    if x.loss_impl in FUSED_LOSS:
        # student logits saved + their gradient in the backward; teacher logits
        loss_img = ncrops * k * 2 * a + x.n_global * k * a
    else:
        pairs = x.n_global * ncrops - min(x.n_global, ncrops)
        loss_img = ncrops * k * 2 * a + pairs * k * 4 + x.n_global * k * (a + 4)
    input_img = x.input_batches_in_flight * 4 * 3 * (x.n_global * x.global_size ** 2 + x.n_local * x.local_size ** 2)
    # last-layer weight W = g·v/||v|| (K, bottleneck), recomputed each forward and saved by the
    # linear: fp32 (+ its bf16 copy under autocast; bf16 only under FSDP2's bf16 policy)
    fixed = k * bb * ((4 + a) if autocast else a)

    micro = math.ceil(x.batch_size_per_gpu / x.grad_accum_steps)
    total = int(x.gpu_memory_gib * GiB)
    usable = int(total * (1 - x.safety_frac) - x.reserved_gib * GiB)
    return MemoryPlan(x, p_student, p_student, p_trainable, backbone, head_total, state, tuple(crops),
                      ncrops * head_row, loss_img, input_img, fixed, micro, total, usable)


# the model fields of TrainConfig at the reference ViT's values: the table's formulas apply as they are
_REFERENCE_VIT = dict(num_register_tokens=0, layerscale_init=0.0, ffn_layer="auto", pos_embed="learned",
                      qkv_bias=True, mask_token=False, untie_global_and_local_cls_norm=False, init_from="")


def _needs_model(cfg) -> bool:
    return cfg.arch not in ARCHS or any(getattr(cfg, k, v) != v for k, v in _REFERENCE_VIT.items())


def memory_plan_from_config(cfg, world_size: int = 1, sharded: bool | None = None,
                            gpu_memory: float | None = None, backbone=None) -> MemoryPlan:
    """The plan for a `dino_fast.train.config.TrainConfig` (field names as there).
    sharded: FSDP2 on (default: cfg.fsdp == "on", or "auto" with world_size > 1).
    backbone: the student backbone; by default built from cfg (or cfg.init_from's architecture)
    on the meta device."""
    if backbone is None and _needs_model(cfg):
        import torch
        from dino_fast.train.build import build_backbone
        init = None
        if getattr(cfg, "init_from", ""):
            from dino_fast.train.init_from import read_init
            init = read_init(cfg.init_from, cfg.init_from_key).architecture_only()
        with torch.device("meta"):
            backbone = build_backbone(cfg, True, init)
    if sharded is None:
        mode = getattr(cfg, "fsdp", "auto")
        sharded = mode == "on" or (mode == "auto" and world_size > 1)
    precision = "fp16" if getattr(cfg, "use_fp16", False) else getattr(cfg, "precision", "bf16")
    return memory_plan(
        cfg.arch, cfg.patch_size, cfg.out_dim, batch_size_per_gpu=cfg.batch_size_per_gpu, world_size=world_size,
        precision=precision, sharded=sharded,
        activation_checkpointing=getattr(cfg, "activation_checkpointing", False),
        global_size=getattr(cfg, "global_size", 224), local_size=getattr(cfg, "local_size", 96),
        n_global=2, n_local=cfg.local_crops_number, grad_accum_steps=getattr(cfg, "grad_accum_steps", 1),
        depth=getattr(cfg, "depth", 0), use_bn_in_head=getattr(cfg, "use_bn_in_head", False),
        norm_last_layer=getattr(cfg, "norm_last_layer", True),
        head_hidden_dim=getattr(cfg, "head_hidden_dim", 2048),
        head_bottleneck_dim=getattr(cfg, "head_bottleneck_dim", 256),
        optimizer=getattr(cfg, "optimizer", "adamw"), attention=getattr(cfg, "attention", "auto"),
        loss_impl=getattr(cfg, "loss_impl", "auto"), backbone=backbone,
        efficient_drop_path_rate=cfg.drop_path_rate if getattr(cfg, "efficient_drop_path", False) else 0.0,
        gpu_memory=gpu_memory if gpu_memory is not None else (getattr(cfg, "gpu_memory", 0) or None))


# ----------------------------------------------------------------------------- output
def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def _mib(n: float) -> str:
    return f"{n / MiB:9.1f}"


def _model_name(x: PlanInputs) -> str:
    sh = x.shape
    if sh is not None and sh.kind == "convnet":
        return f"{x.arch} (convnet, {sh.params / 1e6:.1f} M parameters)"
    extras = []
    if sh is not None:
        extras += [f"{sh.prefix - 1} registers"] if sh.prefix > 1 else []
        extras += ["RoPE"] if sh.rope else []
        extras += ["LayerScale"] if sh.layerscale else []
    return f"{x.arch}/{x.patch_size} (depth {x.depth}{''.join(', ' + e for e in extras)})"


def format_plan(plan: MemoryPlan) -> str:
    """A plain-text table for `dino-fast train --dry_run`."""
    x = plan.inputs
    shard = f"FSDP2 over {x.world_size} GPUs" if x.sharded else (
        "replicated" + (f" on {x.world_size} GPUs" if x.world_size > 1 else ", one GPU"))
    acc = f" ({x.grad_accum_steps} micro-batches of {plan.micro_batch})" if x.grad_accum_steps > 1 else ""
    lines = [
        f"Memory plan per GPU: {_model_name(x)}, K = {x.out_dim}, {x.precision}, {shard}",
        f"  batch {x.batch_size_per_gpu} images per GPU{acc}; crops {x.n_global} x {x.global_size} px + "
        f"{x.n_local} x {x.local_size} px; attention {x.attention}; loss {x.loss_impl}; optimizer {x.optimizer}",
        "",
        f"Parameters: student {plan.params_student / 1e6:.2f} M (backbone {plan.params_backbone / 1e6:.2f} M + "
        f"head {plan.params_head / 1e6:.2f} M; {plan.params_trainable / 1e6:.2f} M trainable), "
        f"teacher {plan.params_teacher / 1e6:.2f} M",
        "",
        f"{'state (per GPU)':<58}{'GiB':>8}",
    ]
    for name, n in plan.state.items():
        lines.append(f"  {name:<56}{_gib(n)}")
    lines.append(f"  {'total':<56}{_gib(plan.state_bytes)}")
    lines += ["", f"{'activations per image (student, saved for backward)':<58}{'MiB':>9}{'MiB ckpt':>10}"
              f"{'MiB sel':>10}"]
    for c in plan.crops:
        tokens = f" ({c.tokens} tokens)" if c.tokens else ""
        label = f"{c.count} x {c.kind} {c.size} px{tokens}, {_mib(c.saved).strip()} MiB each"
        lines.append(f"  {label:<56}{_mib(c.count * c.saved)}{_mib(c.count * c.saved_ckpt):>10}"
                     f"{_mib(c.count * c.saved_selective):>10}")
    lines.append(f"  {'head + logits + loss (' + str(x.n_global + x.n_local) + ' crops x K)':<56}"
                 f"{_mib(plan.head_loss_per_image)}{_mib(plan.head_loss_per_image):>10}"
                 f"{_mib(plan.head_loss_per_image):>10}")
    lines.append(f"  {'input crops (fp32, ' + str(x.input_batches_in_flight) + ' batches in flight)':<56}"
                 f"{_mib(plan.input_per_image)}{_mib(plan.input_per_image):>10}{_mib(plan.input_per_image):>10}")
    def working(ckpt) -> int:
        return (plan.per_image_bytes(ckpt) - plan.activations_per_image(ckpt) - plan.head_loss_per_image
                - plan.input_per_image)

    lines.append(f"  {'backward working set (+ recomputed block with ckpt)':<56}{_mib(working(False))}"
                 f"{_mib(working(True)):>10}{_mib(working('selective')):>10}")
    lines.append(f"  {'total per image':<56}{_mib(plan.per_image_bytes(False))}{_mib(plan.per_image_bytes(True)):>10}"
                 f"{_mib(plan.per_image_bytes('selective')):>10}")
    mb_plain, mb_ckpt = plan.max_micro_batch(False), plan.max_micro_batch(True)
    lines += [
        "",
        f"GPU memory {x.gpu_memory_gib:.1f} GiB ({x.gpu_name}); usable {plan.usable_bytes / GiB:.1f} GiB after a "
        f"{100 * x.safety_frac:.0f} % + {x.reserved_gib:g} GiB margin (CUDA context, workspaces, fragmentation)",
        f"Estimated peak at micro-batch {plan.micro_batch}"
        f"{f' with {checkpoint_mode(x.activation_checkpointing)} activation checkpointing' if x.activation_checkpointing else ''}: "
        f"{plan.estimated_peak_bytes / GiB:.1f} GiB -> {'fits' if plan.fits else 'DOES NOT FIT'}",
        f"Largest micro-batch per GPU that fits: {mb_plain} without activation checkpointing, "
        f"{mb_ckpt} with --activation_checkpointing (full), {plan.max_micro_batch('selective')} with "
        f"--activation_checkpointing selective",
    ]
    return "\n".join(lines)


class TrainingOutOfMemoryError(RuntimeError):
    """A CUDA out-of-memory error in a training step, with the plan's numbers and remedies."""


def _accum_for(batch: int, max_micro: int, current: int) -> int | None:
    """Smallest accumulation factor >= current that divides batch with batch/n <= max_micro."""
    if max_micro < 1:
        return None
    for n in range(max(1, current), batch + 1):
        if batch % n == 0 and batch // n <= max_micro:
            return n
    return None


def oom_error(exc: BaseException, plan: MemoryPlan | None = None, cfg=None, world_size: int = 1) -> RuntimeError:
    """Turn `torch.OutOfMemoryError` from a training step into an error a user can act on.

    Give the run's plan (or its config, from which the plan is built; without either, or if the
    plan cannot be built, the message has the remedies without numbers). Returns the new
    exception; the caller raises it: `raise oom_error(e, plan) from e`.
    """
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if plan is None and cfg is not None:
        try:
            plan = memory_plan_from_config(cfg, world_size)
        except (AttributeError, TypeError, ValueError):   # the plan is a help, never a second failure
            plan = None
    if plan is None:
        return TrainingOutOfMemoryError(
            f"CUDA out of memory in a training step ({first}). Remedies: a smaller micro-batch with the same "
            f"optimisation (raise --grad_accum_steps), --activation_checkpointing true, or fewer "
            f"--local_crops_number; `dino-fast train --dry_run` with the same flags prints the memory plan.")
    x = plan.inputs
    b, micro, acc = x.batch_size_per_gpu, plan.micro_batch, x.grad_accum_steps
    max_now = plan.max_micro_batch()
    lines = [
        f"CUDA out of memory in a training step ({first})",
        f"Memory plan for this run: {x.arch}/{x.patch_size}, {x.n_global} x {x.global_size} px + {x.n_local} x "
        f"{x.local_size} px crops, micro-batch {micro} per GPU ({b} per GPU / --grad_accum_steps {acc}), "
        f"{x.precision}, {'FSDP2 over %d GPUs' % x.world_size if x.sharded else 'not sharded'}, activation "
        f"checkpointing {'on' if x.activation_checkpointing else 'off'}:",
        f"  state {plan.state_bytes / GiB:.1f} GiB + {plan.per_image_bytes() / MiB:.0f} MiB per image x {micro} "
        f"images = estimated peak {plan.estimated_peak_bytes / GiB:.1f} GiB; usable {plan.usable_bytes / GiB:.1f} "
        f"of {x.gpu_memory_gib:.1f} GiB; largest micro-batch that fits: {max_now}.",
    ]
    if plan.fits:
        lines.append("  The plan expected this to fit: another process may hold GPU memory (nvidia-smi), or the "
                     "allocator is fragmented (try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True); the "
                     "values below aim at a peak a quarter under the estimate.")
    # What the remedies aim for: the usable memory, or - when the plan thought this fits - a peak
    # at least a quarter below the current estimate (the plan was off by that much for this GPU).
    budget = int(0.75 * plan.estimated_peak_bytes) if plan.fits else plan.usable_bytes

    def max_micro(p: MemoryPlan) -> int:
        return max(0, (budget - p.state_bytes - p.fixed_bytes) // p.per_image_bytes())

    lines.append("Remedies (the first keeps the training identical):")
    n = _accum_for(b, max_micro(plan), acc)
    if n is not None and n != acc:
        lines.append(f"  1. Smaller micro-batch, same optimisation: --grad_accum_steps {n} (micro-batch "
                     f"{b // n}, still {b} images per GPU per optimizer step; teacher, centre and schedules "
                     f"update once per step).")
    else:
        lines.append(f"  1. Smaller micro-batch with --grad_accum_steps: even a micro-batch of 1 does not fit "
                     f"this setting without the changes below.")
    if not x.activation_checkpointing:
        ck = replan(plan, activation_checkpointing=True)
        n_ck = _accum_for(b, max_micro(ck), acc)
        extra = "" if n_ck in (None, acc) else f" together with --grad_accum_steps {n_ck}"
        lines.append(f"  2. --activation_checkpointing true: activations {plan.activations_per_image() / MiB:.0f} "
                     f"-> {ck.activations_per_image() / MiB:.0f} MiB per image; largest micro-batch "
                     f"{max_micro(ck)}{extra} (about a third more compute per step).")
    else:
        lines.append("  2. Activation checkpointing is already on.")
    fit_local = next((n_local for n_local in range(x.n_local - 1, -1, -1)
                      if max_micro(replan(plan, n_local=n_local)) >= micro), None)
    if x.n_local == 0:
        lines.append("  3. No local crops to remove.")
    elif fit_local is not None:
        lines.append(f"  3. Fewer local crops: --local_crops_number {fit_local} (now {x.n_local}) fits micro-batch "
                     f"{micro}; this changes the method (the paper's best is 10 local crops).")
    else:
        lines.append(f"  3. Fewer local crops: even --local_crops_number 0 does not fit micro-batch {micro}; "
                     f"combine with 1 or 2.")
    return TrainingOutOfMemoryError("\n".join(lines))
