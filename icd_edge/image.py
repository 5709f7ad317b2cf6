"""Image I/O: PIL/arrays ↔ the graphs' [-1, 1] NCHW float32 tensors (``icd_spec.md`` §4).

Fit policies (the graphs take a fixed square side):

* ``stretch`` (default, the official SD1.5 loader's): bicubic resize to the square, aspect not kept;
* ``crop``: centre square crop, then resize (the edges outside the crop are not edited);
* ``pad``: letterbox on white to a square, then resize (the whole photo is edited).

With ``keep_size`` the result is mapped back: ``stretch`` and ``pad`` return the input's width
and height, ``crop`` the size of the cropped square. EXIF orientation is applied first, alpha is
composited on white, palette/greyscale/CMYK/16-bit images are converted to RGB.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from icd_edge.errors import ImageError, InputError

MAX_PIXELS = 64_000_000  # larger inputs are refused before decoding (decompression bombs)
OUTPUT_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def load_image(src) -> Image.Image:
    """Open a path, bytes-like file, numpy HWC uint8 array or PIL image as an RGB PIL image."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3):
            raise ImageError(f"an image array must be uint8 HxW or HxWxC, got {src.dtype} {src.shape}")
        img = Image.fromarray(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"image {path} does not exist or is not a file")
        old = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(path)
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image {path} is too large ({exc}); use a photo under {MAX_PIXELS // 1_000_000} MP") from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{path} is not an image PIL can read (PNG, JPEG, WebP, ...)") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"image {path} is corrupt or truncated: {exc}") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = old
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation, composite alpha on white, convert any mode to 8-bit RGB."""
    if img.width < 1 or img.height < 1:
        raise ImageError(f"image is empty ({img.width}x{img.height})")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block must not make a readable photo unusable
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def image_to_tensor(img: Image.Image, side: int) -> np.ndarray:
    """(1, 3, side, side) float32 in [-1, 1]: bicubic resize, ``x/127.5 - 1``."""
    if img.size != (side, side):
        img = img.resize((side, side), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    return arr.transpose(2, 0, 1)[None].copy()


def tensor_to_array(x: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) [-1, 1] → (H, W, 3) float32 in [0, 1] (clamped)."""
    return np.clip(x[0].transpose(1, 2, 0) / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """(H, W, 3) [0, 1] → uint8 PIL by truncation (×255), as the official decoder does."""
    return Image.fromarray((arr * 255.0).astype(np.uint8), "RGB")


def check_output_path(path: str | Path) -> tuple[Path, str]:
    """Validate an output image path before any work; returns (path, PIL format)."""
    path = Path(path)
    fmt = OUTPUT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"output {path} must end in one of {', '.join(sorted(OUTPUT_SUFFIXES))}")
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name such as {path / 'out.png'}")
    return path, fmt


def save_image(img: Image.Image, path: str | Path) -> Path:
    """Save atomically (temp file + rename); the format follows the suffix."""
    from icd_edge.atomic import atomic_file

    path, fmt = check_output_path(path)
    with atomic_file(path) as tmp:
        img.save(tmp, format=fmt)
    return path


FITS = ("stretch", "crop", "pad")


def fit_square(img: Image.Image, side: int, fit: str) -> tuple[Image.Image, tuple]:
    """Square ``side``×``side`` image for the graphs plus what :func:`restore_fit` needs."""
    if fit not in FITS:
        raise InputError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    w, h = img.size
    if fit == "crop":
        m = min(w, h)
        left, top = (w - m) // 2, (h - m) // 2
        img = img.crop((left, top, left + m, top + m))
    elif fit == "pad":
        m = max(w, h)
        canvas = Image.new("RGB", (m, m), (255, 255, 255))
        canvas.paste(img, ((m - w) // 2, (m - h) // 2))
        img = canvas
    if img.size != (side, side):
        img = img.resize((side, side), Image.BICUBIC)
    return img, (fit, w, h)


def restore_fit(img: Image.Image, info: tuple) -> Image.Image:
    """Map a square result back to the input's geometry (see the module docstring)."""
    fit, w, h = info
    if fit == "stretch":
        return img.resize((w, h), Image.BICUBIC)
    if fit == "crop":
        m = min(w, h)
        return img.resize((m, m), Image.BICUBIC)
    m = max(w, h)
    big = img.resize((m, m), Image.BICUBIC)
    left, top = (m - w) // 2, (m - h) // 2
    return big.crop((left, top, left + w, top + h))
