"""DINO pretraining: `dino-fast train`.

config.py   TrainConfig (every reference main_dino.py argument + dino-fast's own), CLI flags
presets.py  named configs: vit_s16_in1k, vit_b16_in1k, vit_b8_in1k, demo
build.py    student/teacher MultiCropWrapper(ViT, DINOHead), FSDP2 sharding, mixed precision
step.py     one optimizer step (forward → loss → backward → step → EMA), gradient accumulation
optim.py    parameter groups, per-tensor clipping, last-layer freezing, LARS, schedules
loop.py     train(cfg): the epoch loop, logging, checkpoints, resume
checkpoint.py, logger.py, demo.py

The tools around a run (memory plan, launch, collapse monitor) are in dino_fast.runtime.
"""
