"""Image patches for the vision task, from the images matplotlib ships (no download).

Sources (``matplotlib.cbook.get_sample_data``; all present in matplotlib 3.11.2, checked there):

=========================== ============================ ====================================
file                        content                      read as
=========================== ============================ ====================================
``grace_hopper.jpg``        photo, 600×512 RGB uint8     ``matplotlib.image.imread``
``s1045.ima.gz``            MRI slice, 256×256 uint16    raw bytes (gzip), native ``uint16``
``jacksboro_fault_dem.npz`` elevation map, 344×403 int16 ``np.load(...)["elevation"]``
``topobathy.npz``           topography/bathymetry, 91×120 ``np.load(...)["topo"]`` (float32)
=========================== ============================ ====================================

(Other sample files — ``logo2.png``, ``Minduka_Present_Blue_Pack.png``, ``axes_grid/bivariate_normal.npy``
— exist too but are graphics or synthetic, and are not used by default.)

Pipeline per image: read → float64 → ``channels=1``: RGB becomes luminance ``0.299 R + 0.587 G +
0.114 B``; ``channels=3``: a grayscale image is repeated 3 times → min-max scaled to ``[0, 1]`` (a
constant image is an error) → downscaled by area averaging so that its longer side is at most
``max_side`` (never upscaled) → ``[-1, 1]`` (``2x − 1``, the usual DDPM data range), float32.

Split (deterministic, no pixel shared between train and validation): each image is cut into the grid
of non-overlapping ``size×size`` tiles; a ``torch.Generator`` seeded with ``seed + image index``
picks ``max(1, round(val_fraction · tiles))`` of them as validation patches. Training patches are all
``size×size`` windows on a ``stride`` grid that intersect no validation tile. Each patch carries its
origin ``(image index, y, x)``.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # numpy comes with matplotlib (the demo extra); imported where used
    import numpy as np

__all__ = ["SAMPLE_IMAGES", "ImageDataError", "PatchSet", "image_grid", "load_patches", "load_sample_image"]

#: The default images (file names relative to matplotlib's ``sample_data`` folder).
SAMPLE_IMAGES: tuple[str, ...] = (
    "grace_hopper.jpg",
    "s1045.ima.gz",
    "jacksboro_fault_dem.npz",
    "topobathy.npz",
)
_NPZ_KEYS = {"jacksboro_fault_dem.npz": "elevation", "topobathy.npz": "topo"}


class ImageDataError(ValueError):
    """A sample image is missing or unreadable, or the patch settings select no patch."""


def _sample_path(name: str, root: str | Path | None) -> Path:
    if root is not None:
        return Path(root) / name
    try:
        import matplotlib.cbook
    except ImportError:
        raise ImageDataError(
            f"sample image {name!r}: the default images come with matplotlib, which is not installed; "
            "install the demo extra (pip install 'coap-compile[demo]') or pass a folder of images (root=)"
        ) from None

    return Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))


def _read(name: str, path: Path) -> np.ndarray:
    import numpy as np

    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".ima.gz") else path.suffix.lower()
    if suffix == ".ima.gz":
        raw = np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint16)
        side = math.isqrt(raw.size)
        if side * side != raw.size or side == 0:
            raise ValueError(f"{raw.size} uint16 values do not form a square image")
        return raw.reshape(side, side)
    if suffix == ".npz":
        with np.load(path) as data:
            key = _NPZ_KEYS.get(name) or data.files[0]
            return np.asarray(data[key])
    if suffix == ".npy":
        return np.load(path)
    import matplotlib.image

    return np.asarray(matplotlib.image.imread(path))


def load_sample_image(name: str, *, channels: int = 1, root: str | Path | None = None) -> np.ndarray:
    """One image as float64 in ``[0, 1]``: ``H×W`` (``channels=1``) or ``H×W×3`` (``channels=3``).

    ``root`` replaces matplotlib's ``sample_data`` folder (for tests). Raises :class:`ImageDataError`
    naming the file when it is missing or cannot be decoded.
    """
    import numpy as np

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    path = _sample_path(name, root)
    if not path.is_file():
        raise ImageDataError(
            f"sample image {name!r} not found at {path} (expected in matplotlib's sample_data folder; "
            "reinstall matplotlib or pass other images=)"
        )
    try:
        img = np.asarray(_read(name, path), dtype=np.float64)
    except Exception as exc:
        raise ImageDataError(
            f"cannot read sample image {name!r} at {path}: {type(exc).__name__}: {exc}"
        ) from exc
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]  # drop alpha
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or min(img.shape[:2]) < 2:
        raise ImageDataError(f"sample image {name!r} at {path} has unsupported shape {img.shape}")
    if not np.isfinite(img).all():
        raise ImageDataError(f"sample image {name!r} at {path} contains non-finite values")
    if channels == 1 and img.ndim == 3:
        img = img @ np.array([0.299, 0.587, 0.114])
    elif channels == 3 and img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        raise ImageDataError(f"sample image {name!r} at {path} is constant ({lo}); nothing to learn")
    return (img - lo) / (hi - lo)


@dataclass(frozen=True)
class PatchSet:
    """Training and validation patches, ``N×C×size×size`` float32 in ``[-1, 1]``.

    Attributes:
        train, val: the patches.
        train_origins, val_origins: ``N×3`` int64 ``(image index, y, x)`` of each patch's top-left pixel
            in the (downscaled) image ``sources[index]``.
        sources: the file names, in image-index order; image_shapes: their downscaled ``(H, W)``.
    """

    train: Tensor
    val: Tensor
    train_origins: Tensor
    val_origins: Tensor
    sources: tuple[str, ...]
    image_shapes: tuple[tuple[int, int], ...]


def _downscale(img: np.ndarray, max_side: int | None) -> Tensor:
    import numpy as np

    t = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float64)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    h, w = t.shape[1:]
    if max_side is not None and max(h, w) > max_side:
        f = max_side / max(h, w)
        size = (max(1, round(h * f)), max(1, round(w * f)))
        t = F.interpolate(t.unsqueeze(0), size=size, mode="area").squeeze(0)
    return t  # C×H×W in [0, 1]


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def load_patches(
    *,
    size: int = 32,
    channels: int = 1,
    stride: int | None = None,
    val_fraction: float = 0.2,
    max_side: int | None = 192,
    images: Sequence[str] = SAMPLE_IMAGES,
    seed: int = 0,
    root: str | Path | None = None,
) -> PatchSet:
    """Patches of ``images`` with the deterministic split of the module docstring.

    Args:
        size: patch side. channels: 1 (grayscale) or 3. stride: training window step (``size // 4``).
        val_fraction: share of each image's tiles held out, in ``(0, 1)``.
        max_side: longest image side after area downscaling (``None``: full resolution).
        seed: seeds the choice of validation tiles. root: folder replacing matplotlib's sample data.
    """
    _check_int("size", size, 2)
    stride = _check_int("stride", size // 4 if stride is None else stride, 1)
    if max_side is not None:
        _check_int("max_side", max_side, size)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not images:
        raise ValueError("images must name at least one sample image, got an empty sequence")
    train, val, t_org, v_org, shapes = [], [], [], [], []
    for index, name in enumerate(images):
        img = _downscale(load_sample_image(name, channels=channels, root=root), max_side) * 2 - 1
        h, w = img.shape[1:]
        shapes.append((h, w))
        tiles = [(y, x) for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]
        if not tiles:
            raise ImageDataError(
                f"sample image {name!r} ({h}×{w} after downscaling) is smaller than size={size}"
            )
        gen = torch.Generator().manual_seed(seed + index)
        n_val = max(1, round(val_fraction * len(tiles)))
        picked = sorted(int(i) for i in torch.randperm(len(tiles), generator=gen)[:n_val])
        held = torch.zeros(h, w, dtype=torch.bool)
        for i in picked:
            y, x = tiles[i]
            held[y : y + size, x : x + size] = True
            val.append(img[:, y : y + size, x : x + size])
            v_org.append((index, y, x))
        for y in range(0, h - size + 1, stride):
            for x in range(0, w - size + 1, stride):
                if not held[y : y + size, x : x + size].any():
                    train.append(img[:, y : y + size, x : x + size])
                    t_org.append((index, y, x))
    if not train:
        raise ImageDataError(
            f"no training patch left (size={size}, stride={stride}, val_fraction={val_fraction})"
        )
    return PatchSet(
        train=torch.stack(train).float(),
        val=torch.stack(val).float(),
        train_origins=torch.tensor(t_org, dtype=torch.int64),
        val_origins=torch.tensor(v_org, dtype=torch.int64),
        sources=tuple(images),
        image_shapes=tuple(shapes),
    )


def image_grid(rows: Sequence[Tensor], *, pad: int = 2) -> np.ndarray:
    """Tile rows of patches (each ``N×C×s×s`` in ``[-1, 1]``, same N) into one ``H×W×3`` float image in
    ``[0, 1]`` (for ``matplotlib.image.imsave``); e.g. rows = (clean, noisy, denoised)."""
    import numpy as np

    if not rows:
        raise ValueError("image_grid needs at least one row of patches")
    n, c, s, _ = rows[0].shape
    out = np.ones((len(rows) * (s + pad) + pad, n * (s + pad) + pad, 3))
    for i, row in enumerate(rows):
        if row.shape != rows[0].shape:
            raise ValueError(f"row {i} has shape {tuple(row.shape)}, expected {tuple(rows[0].shape)}")
        arr = ((row.detach().float().clamp(-1, 1) + 1) / 2).cpu().numpy()
        arr = np.repeat(arr, 3, axis=1) if c == 1 else arr
        for j in range(n):
            y, x = pad + i * (s + pad), pad + j * (s + pad)
            out[y : y + s, x : x + s] = arr[j].transpose(1, 2, 0)
    return out
