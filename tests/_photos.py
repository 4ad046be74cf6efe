"""Real photographs shipped with scikit-image, and small helpers the
retrieval / copy detection / video segmentation / PCA tests share."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

# distinct scenes (no two crops of the same picture)
NAMES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
         "retina", "brick", "grass", "coins", "moon", "page", "clock", "colorwheel", "text")


def photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB; size = (W, H) resizes (bicubic)."""
    import skimage.data
    a = getattr(skimage.data, name)()
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    img = Image.fromarray(a[..., :3].astype(np.uint8))
    if size is not None:
        img = img.resize(size, Image.BICUBIC)
    return np.asarray(img)


def photos(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    if n > len(NAMES):
        raise ValueError(f"only {len(NAMES)} distinct photographs")
    return [photo(name, size) for name in NAMES[:n]]


def jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def save(a: np.ndarray, path, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, quality=quality) if str(path).endswith(".jpg") else Image.fromarray(a).save(path)


def thumb_feature(img: Image.Image | np.ndarray, side: int = 8) -> torch.Tensor:
    """An identity-like image descriptor: the side x side grayscale
    thumbnail, standardised (invariant to brightness / contrast, nearly to
    JPEG and rescaling), L2-normalised."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    g = np.asarray(img.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float64).ravel()
    g = (g - g.mean()) / (g.std() + 1e-8)
    return torch.from_numpy(g / np.linalg.norm(g)).float()


def tiny_vit_checkpoint(path, patch_size: int = 8, depth: int = 2, seed: int = 0):
    """A randomly initialised ViT-tiny saved as a training checkpoint (teacher key)."""
    from dino_fast.model import vit_tiny
    torch.manual_seed(seed)
    model = vit_tiny(patch_size=patch_size, depth=depth).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, path)
    return model
