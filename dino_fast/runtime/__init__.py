"""Tools around a training run (the loop itself is `dino_fast.train`).

memory.py   memory plan per GPU (`--dry_run`), the OOM message with its remedies
launch.py   process placement: plain / torchrun / SLURM, distributed init, named collectives with timeouts
health.py   collapse monitor (paper Section 5.3) and the plain health-statistics reference
"""
