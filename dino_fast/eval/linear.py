"""Linear probe on frozen features, as the reference eval_linear.py.

Features (reference): the CLS tokens of the last n blocks concatenated
(n = 4 for ViT-S, n = 1 for ViT-B), for ViT-B interleaved with the average of
the last block's patch tokens (the reference's cat(..., -1).reshape order,
so a probe trained here loads into the reference's LinearClassifier).
Classifier: one nn.Linear, weight ~ N(0, 0.01), bias 0, no batch norm.
Optimiser: SGD momentum 0.9, weight decay 0, lr = base_lr * batch / 256,
cosine annealing to 0 over the epochs (stepped per epoch).

Difference, for speed: the reference augments the train images every epoch
(RandomResizedCrop + flip) and re-runs the frozen backbone on them; here the
features of the train images are computed ONCE with the plain eval transform
(Resize 256 + CenterCrop 224) and cached, and the probe trains on those.
That is one backbone pass instead of `epochs` passes; accuracies can differ
slightly from the reference protocol's (usually a little lower, <= ~1 point
on ImageNet, since there is no augmentation).

An lr grid trains one classifier per lr on the same batches (one backbone
pass, one shuffling) and keeps the best on the validation set. As the
reference's reported "max accuracy", that choice is made on the val set.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

# DINOv2's linear-eval lr grid (base lr for a batch of 256).
DEFAULT_LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def default_probe_layout(embed_dim: int) -> tuple[int, bool]:
    """(n_last_blocks, avgpool_patchtokens) of the paper: ViT-B (768): (1, True), else (4, False)."""
    return (1, True) if embed_dim >= 768 else (4, False)


def linear_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int = 4,
                    avgpool_patchtokens: bool = False) -> torch.Tensor:
    """The reference eval_linear.py features: (B, n*D) or (B, 2D) with avgpool (the patch
    tokens only: registers are left out, as DINOv2's linear eval); a convnet's pooled
    features (B, F), as the reference does for ResNets."""
    if not hasattr(model, "get_intermediate_layers"):
        return model(images)                                               # (B, F)
    intermediate = model.get_intermediate_layers(images, n_last_blocks)   # n x (B, L, D)
    output = torch.cat([x[:, 0] for x in intermediate], dim=-1)            # (B, n*D)
    if avgpool_patchtokens:
        prefix = getattr(model, "num_prefix_tokens", 1)                    # CLS + registers
        pooled = intermediate[-1][:, prefix:].mean(dim=1)                  # (B, D)
        output = torch.cat((output.unsqueeze(-1), pooled.unsqueeze(-1)), dim=-1)  # (B, D, 2), n == 1
        output = output.reshape(output.shape[0], -1)                       # (B, 2D) interleaved
    return output


class LinearClassifier(nn.Module):
    """Linear layer on frozen features (the reference's, same names)."""

    def __init__(self, dim: int, num_labels: int = 1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(x.size(0), -1))


@dataclass
class ProbeResult:
    lr: float                       # base lr (per 256) of the kept classifier
    top1: float                     # val top-1 (%) after the last epoch
    top5: float | None              # val top-5 (%), None with < 5 classes
    best_top1: float                # best val top-1 over the validated epochs (the reference's "max accuracy")
    classifier: LinearClassifier
    grid: dict = field(default_factory=dict)     # base lr -> final val top-1
    history: list = field(default_factory=list)  # per validated epoch: {epoch, lr: top1}


@torch.no_grad()
def evaluate_probe(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 4096) -> tuple[float, float | None]:
    """(top1, top5) in percent; top5 None with fewer than 5 classes."""
    classifier.eval()
    n1 = n5 = 0
    with5 = classifier.num_labels >= 5
    for i in range(0, features.shape[0], batch_size):
        logits = classifier(features[i:i + batch_size])
        y = labels[i:i + batch_size].view(-1, 1)
        top = logits.topk(5 if with5 else 1, dim=1).indices
        n1 += top[:, :1].eq(y).sum().item()
        if with5:
            n5 += top.eq(y).any(dim=1).sum().item()
    total = max(features.shape[0], 1)
    return n1 * 100.0 / total, (n5 * 100.0 / total if with5 else None)


def train_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                       val_labels: torch.Tensor, num_labels: int, *, epochs: int = 100, lr: float = 0.001,
                       lr_grid=None, batch_size: int = 1024, val_freq: int = 1, seed: int = 0,
                       progress: bool = False) -> ProbeResult:
    """Train the reference linear probe on precomputed features (on their
    device). lr (or each lr of lr_grid) is per 256 images; the step lr is
    lr * batch_size / 256. Returns the classifier with the best final val
    top-1 (a single one without a grid)."""
    device = train_features.device
    train_labels, val_labels = train_labels.to(device), val_labels.to(device)
    val_features = val_features.to(device)
    lrs = [float(x) for x in (lr_grid if lr_grid else (lr,))]
    if epochs < 1 or batch_size < 1 or any(x <= 0 for x in lrs):
        raise ValueError(f"epochs ({epochs}), batch_size ({batch_size}) and lrs ({lrs}) must be positive")
    g = torch.Generator(device="cpu").manual_seed(seed)
    dim = train_features.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = nn.ModuleList([LinearClassifier(dim, num_labels) for _ in lrs]).to(device)
    scale = batch_size / 256.0  # linear scaling rule
    opt = torch.optim.SGD([{"params": h.parameters(), "lr": base * scale} for h, base in zip(heads, lrs)],
                          momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    n = train_features.shape[0]
    history, best = [], [0.0] * len(lrs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=epochs, desc="linear probe", unit="epoch", dynamic_ncols=True)
    for epoch in range(epochs):
        heads.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x, y = train_features[idx], train_labels[idx]               # (b, F), (b,)
            loss = sum(F.cross_entropy(h(x), y) for h in heads)         # independent heads: grads do not mix
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if epoch % val_freq == 0 or epoch == epochs - 1:
            accs = [evaluate_probe(h, val_features, val_labels)[0] for h in heads]
            best = [max(b, a) for b, a in zip(best, accs)]
            history.append({"epoch": epoch, **{str(base): a for base, a in zip(lrs, accs)}})
            log.info("epoch %d: val top-1 %s", epoch, ", ".join(f"lr {b:g}: {a:.2f}" for b, a in zip(lrs, accs)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(top1=f"{max(accs):.2f}" if history and history[-1]["epoch"] == epoch else "")
    if bar is not None:
        bar.close()
    final = [evaluate_probe(h, val_features, val_labels) for h in heads]
    k = max(range(len(lrs)), key=lambda j: final[j][0])
    return ProbeResult(lr=lrs[k], top1=final[k][0], top5=final[k][1], best_top1=best[k], classifier=heads[k],
                       grid={b: f[0] for b, f in zip(lrs, final)}, history=history)
