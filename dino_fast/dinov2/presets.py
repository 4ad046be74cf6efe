"""Presets of the dinov2 method (merged into dino_fast.train.presets.PRESETS).

dinov2_vitl16_in1k — DINOv2's published ImageNet-1k ViT-L recipe: facebookresearch/dinov2
  dinov2/configs/train/vitl16_short.yaml (dataset ImageNet:split=TRAIN, batch_size_per_gpu 64,
  block_chunks 4) on top of dinov2/configs/ssl_default_config.yaml:
  student: arch vit_large, patch_size 16, drop_path_rate 0.3, drop_path_uniform true, layerscale
    1e-5, ffn_layer mlp, qkv_bias true, num_register_tokens 0, interpolate_offset 0.1 and
    interpolate_antialias false (our pos_interp "reference");
  dino: loss_weight 1.0, head_n_prototypes 65536, head_bottleneck_dim 256, head_nlayers 3,
    head_hidden_dim 2048, koleo_loss_weight 0.1; DINOv2's DINOHead fills weight_g with 1 and
    trains it (our norm_last_layer false);
  ibot: loss_weight 1.0, mask_sample_probability 0.5, mask_ratio_min_max (0.1, 0.5),
    separate_head false; train.centering "centering" (our softmax);
  teacher: momentum_teacher 0.992 -> final 1, warmup_teacher_temp 0.04, teacher_temp 0.07,
    warmup_teacher_temp_epochs 30;
  optim: epochs 100, weight_decay 0.04 -> weight_decay_end 0.4, base_lr 0.004 for a batch of
    1024 with scaling_rule sqrt_wrt_1024, warmup_epochs 10, min_lr 1e-6, clip_grad 3.0,
    freeze_last_layer_epochs 1, patch_embed_lr_mult 0.2, layerwise_decay 0.9, AdamW betas
    (0.9, 0.999) (torch's defaults, which build_optimizer uses);
  crops: global_crops_scale (0.32, 1.0), local_crops_number 8, local_crops_scale (0.05, 0.32),
    global_crops_size 224, local_crops_size 96.
  DINOv2 counts an "epoch" as OFFICIAL_EPOCH_LENGTH = 1250 iterations, dino-fast as one pass
  over the data. The DINOv2 README runs this config on 4 A100-80GB nodes (32 GPUs), a total
  batch of 32 x 64 = 2048 (the config itself does not state it); there one DINOv2 epoch is
  1250 x 2048 = 2.56 M images = 2.0 passes over ImageNet-1k's 1,281,167 training images, so
  every epoch count is doubled here: 200 epochs, warm-up 20, teacher warm-up 60, last layer
  frozen 2 (at another total batch, scale them by 1250 x batch / 1,281,167 yourself).
  Precision: DINOv2 runs fp16 with a grad scaler; this preset keeps dino-fast's bf16.
  Published result (DINOv2 README, "Fast setup"): about 1 day, 81.6 % k-NN, 82.9 % linear.

dinov2_vitl14_in1k — the same recipe at patch 14 (the patch of DINOv2's released ViT-L/14;
  DINOv2's own ImageNet-1k config is patch 16, above; its vitl14.yaml is the LVD-142M run).

dinov3_vitl16_in1k — DINOv3's ImageNet-1k ViT-L recipe: facebookresearch/dinov3
  dinov3/configs/train/vitl_im1k_lin834.yaml (its header: "gives 82.2 im1k-knn, 83.3
  im1k-linear", "runs with a total batch size of 2048 (64/gpu, 4 nodes here)"):
  student: arch vit_large, patch_size 16, drop_path_rate 0.3 in every block (DINOv3's ViT
    passes the rate to each block: uniform), layerscale 1e-5, ffn_layer mlp, ffn_ratio 4,
    qkv_bias true, n_storage_tokens 0, mask_k_bias false, pos_embed_type rope,
    pos_embed_rope_base 100, normalize_coords separate, no shift / jitter / rescale;
  dino: loss_weight 1.0, global_ignore_diagonal true (the only pairing here), 65536
    prototypes, bottleneck 256, 3 layers, hidden 2048, head_norm_last_layer false,
    koleo_loss_weight 0.1 (koleo_loss_distributed false);
  ibot: loss_weight 1.0, mask_sample_probability 0.5, mask_ratio_min_max (0.1, 0.5),
    separate_head true, 65536 prototypes, bottleneck 256, hidden 2048, head_norm_last_layer false;
  train: centering sinkhorn_knopp; teacher: momentum 0.992 -> 1, temperature 0.04 -> 0.07 over
    30 epochs; optim: epochs 100, weight_decay 0.04 -> 0.4, lr 0.001 with sqrt_wrt_1024,
    warmup_epochs 10, min_lr 1e-6, clip_grad 3.0, freeze_last_layer_epochs 1,
    patch_embed_lr_mult 0.2, layerwise_decay 0.9, AdamW (0.9, 0.999); compute_precision bf16
    params / fp32 reduce; crops as DINOv2's above; OFFICIAL_EPOCH_LENGTH 1250 at the stated
    total batch 2048, so the epoch counts are doubled as above. Gram anchoring is off there
    (gram.use_loss false in ssl_default_config.yaml).
  Published result (DINOv3 README, ImageNet-1k ViT-L/16 on 4 H100-80GB nodes = 32 GPUs):
  about 14 hours, 82.0 % k-NN, 83.5 % linear (the config's header says 82.2 / 83.3).
  Differences: DINOv3's heads with head_norm_last_layer false are plain linear layers; ours keep
  the weight-normalised parametrisation with a trainable norm (the same function class).
"""
from __future__ import annotations

_DINOV2_VITL = dict(
    method="dinov2", arch="vit_large", patch_size=16, drop_path_rate=0.3, drop_path_uniform=True,
    layerscale_init=1e-5, ffn_layer="mlp", qkv_bias=True, num_register_tokens=0, pos_interp="reference",
    out_dim=65536, head_bottleneck_dim=256, head_hidden_dim=2048, norm_last_layer=False,
    dino_loss_weight=1.0, koleo_loss_weight=0.1, ibot_loss_weight=1.0, mask_sample_probability=0.5,
    mask_ratio_min_max=(0.1, 0.5), ibot_separate_head=False, centering="softmax",
    momentum_teacher=0.992, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=60,
    epochs=200, weight_decay=0.04, weight_decay_end=0.4, lr=0.004, lr_scaling="sqrt_wrt_1024",
    warmup_epochs=20, min_lr=1e-6, clip_grad=3.0, freeze_last_layer=2, patch_embed_lr_mult=0.2,
    layerwise_decay=0.9, global_crops_scale=(0.32, 1.0), local_crops_number=8, local_crops_scale=(0.05, 0.32),
    global_size=224, local_size=96, batch_size_per_gpu=64, optimizer="adamw", precision="bf16")

_DINOV3_VITL = dict(
    _DINOV2_VITL, pos_embed="rope", rope_base=100.0, rope_normalize_coords="separate", pos_interp="auto",
    ibot_separate_head=True, ibot_out_dim=65536, ibot_head_bottleneck_dim=256, ibot_head_hidden_dim=2048,
    centering="sinkhorn_knopp", lr=0.001)

DINOV2_PRESETS: dict[str, dict] = {
    "dinov2_vitl16_in1k": _DINOV2_VITL,
    "dinov2_vitl14_in1k": dict(_DINOV2_VITL, patch_size=14),
    "dinov3_vitl16_in1k": _DINOV3_VITL,
    # `dino-fast train --method dinov2`: the DINO demo (4-block ViT-tiny/7 on the shipped 28 px
    # Fashion-MNIST images) with the DINOv2 objective: DINO + iBOT (shared head) + KoLeo, 4 epochs.
    # Measured: weighted 20-NN 60.3 % -> 67.0 %, 2.0 min and 232 CPU-seconds on an idle 2-core CPU.
    "dinov2_demo": None,   # filled from the DINO demo in dino_fast.train.presets
}


def dinov2_demo(demo: dict) -> dict:
    # batch 32 and teacher temperature 0.04 as measured (the DINO demo moved to batch 16 at 0.02)
    return dict(demo, method="dinov2", output_dir="dinov2_demo", epochs=4, koleo_loss_weight=0.1,
                ibot_loss_weight=1.0, layerwise_decay=1.0, batch_size_per_gpu=32, teacher_temp=0.04,
                warmup_teacher_temp=0.04)
