"""Evaluation of DINO backbones: weighted k-NN (knn.py), linear probe
(linear.py), CLS self-attention maps (attention.py), export (export.py) and
`load` (load.py), with cached feature extraction (features.py) on ImageFolder
data (data.py). Modules are imported on use; `dino_fast.load` is load.load."""
