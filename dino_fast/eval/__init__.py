"""Evaluation of DINO backbones: weighted k-NN (knn.py), linear probe
(linear.py), CLS self-attention maps (attention.py), image retrieval
(retrieval.py, revisitop.py), copy detection (copydetect.py, whitening.py),
video segmentation by label propagation (videoseg.py, davis.py,
davis_metrics.py), PCA feature maps (pca.py), the training-time k-NN
monitor (monitor.py), export (export.py) and `load` (load.py), with cached
feature extraction (features.py) on ImageFolder data (data.py) or image
lists (image_list.py); last-block tokens in dense.py. Modules are imported
on use; `dino_fast.load` is load.load."""
