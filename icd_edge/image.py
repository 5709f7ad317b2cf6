"""Image I/O: PIL/arrays ↔ the graphs' [-1, 1] NCHW float32 tensors (the SD VAE's convention).

Fit policies (the graphs take a fixed square side):

* ``stretch`` (default, the official SD1.5 loader's): bicubic resize to the square, aspect not kept;
* ``crop``: centre square crop, then resize (the edges outside the crop are not edited);
* ``pad``: letterbox on white to a square, then resize (the whole photo is edited).

With ``keep_size`` the result is mapped back: ``stretch`` and ``pad`` return the input's width
and height, ``crop`` the size of the cropped square. EXIF orientation is applied first, alpha is
composited on white, palette/greyscale/CMYK/16-bit images are converted to RGB.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from icd_edge.errors import ImageError, InputError

MAX_PIXELS = 64_000_000  # larger inputs are refused before decoding (decompression bombs)
OUTPUT_SUFFIXES = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def load_image(src) -> Image.Image:
    """Open a path, bytes, a binary file object, a numpy array or a PIL image as an RGB PIL image.

    Arrays are H×W or H×W×{1,3,4} (channels last): uint8, uint16 (0..65535), bool, or float in
    [0, 1] (a float array whose values reach above 1 is read as 0..255). NaN/inf are refused.
    """
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        img = _array_to_image(src)
    elif isinstance(src, (bytes, bytearray, memoryview)) or (hasattr(src, "read") and not isinstance(src, (str, Path))):
        import io

        try:
            data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else src.read()
        except OSError as exc:
            raise ImageError(f"cannot read the image stream: {exc}") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(
                f"an image file object must be opened in binary mode ('rb'), it returned {type(data).__name__}"
            )
        img = _decode(lambda: Image.open(io.BytesIO(data)), "the image bytes")
    elif isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"image {path} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            raise ImageError(f"image {path} is not readable (permission denied); check its permissions")
        img = _decode(lambda: Image.open(path), f"image {path}")
    else:
        raise ImageError(
            f"an image is a path, bytes, a binary file, a numpy array or a PIL image; got {type(src).__name__}"
        )
    return to_rgb(img)


def _decode(opener, what: str) -> Image.Image:
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = opener()
            img.load()
        return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{what} is too large ({exc}); use a photo under {MAX_PIXELS // 1_000_000} MP") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{what} is not an image PIL can read (PNG, JPEG, WebP, ...)") from exc
    except PermissionError as exc:
        raise ImageError(f"{what} is not readable (permission denied); check its permissions") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what} is corrupt or truncated: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _array_to_image(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        hint = " (channels first? use arr.transpose(1, 2, 0))" if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) else ""
        raise ImageError(f"an image array must be H×W or H×W×C with C in 1, 3, 4; got shape {arr.shape}{hint}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"image array is empty (shape {arr.shape})")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = _float_to_uint8(arr.astype(np.float64))
    elif arr.dtype != np.uint8:
        raise ImageError(f"an image array must be uint8, uint16, bool or float; got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise ImageError("the image has NaN or infinite values; pass finite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 255:
        raise ImageError(f"float image values must lie in [0, 1] (or 0..255); got [{lo:g}, {hi:g}]")
    scale = 255.0 if hi <= 1.0 else 1.0  # 0..1 floats, else floats already on the 0..255 scale
    return np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)


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
        img = Image.fromarray(_float_to_uint8(np.asarray(img, dtype=np.float64)), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def image_to_uint8(img: Image.Image, side: int) -> np.ndarray:
    """(side, side, 3) uint8 after the bicubic resize (what :func:`image_to_tensor` normalises)."""
    if img.size != (side, side):
        img = img.resize((side, side), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def photo_uint8(src, side: int) -> np.ndarray:
    """:func:`load_image` then :func:`image_to_uint8`, without the PIL round trip for what needs
    none: a C-contiguous (side, side, 3) uint8 array comes back as it is (the round trip returns
    the same bytes), anything else takes the general path."""
    if (
        isinstance(src, np.ndarray)
        and src.dtype == np.uint8
        and src.shape == (side, side, 3)
        and src.flags.c_contiguous
    ):
        return src
    return image_to_uint8(load_image(src), side)


def image_to_tensor(img: Image.Image, side: int) -> np.ndarray:
    """(1, 3, side, side) float32 in [-1, 1]: bicubic resize, ``x/127.5 - 1``."""
    arr = image_to_uint8(img, side).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return arr.transpose(2, 0, 1)[None].copy()


def tensor_to_array(x: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) [-1, 1] → (H, W, 3) float32 in [0, 1] (clamped)."""
    return np.clip(x[0].transpose(1, 2, 0) / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)


def array_to_pil(arr: np.ndarray, to_uint8: str = "truncate") -> Image.Image:
    """(H, W, 3) [0, 1] → uint8 PIL (×255): by truncation, as the official SD1.5 decoder does, or
    rounded (``to_uint8="round"``), as its SDXL code does."""
    scaled = arr * 255.0
    return Image.fromarray((np.round(scaled) if to_uint8 == "round" else scaled).astype(np.uint8), "RGB")


METADATA_KEY = "icd_edge"  # PNG text chunk; JPEG/WebP/TIFF: EXIF ImageDescription "icd_edge:{json}"
_EXIF_DESCRIPTION = 0x010E
LOSSY = ("JPEG", "WEBP")


def check_output_path(path: str | Path, *, input_path=None, force: bool = False) -> tuple[Path, str]:
    """Validate an output image path before any work; returns (path, PIL format).

    The folder must exist and take a new file, the name must fit the file system, and the
    output may be the input photo only with ``force``."""
    from icd_edge.atomic import check_output_file
    from icd_edge.errors import OutputError

    path = Path(path)
    fmt = OUTPUT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"output {path} must end in one of {', '.join(sorted(OUTPUT_SUFFIXES))}")
    check_output_file(path)
    if not force and input_path is not None and path.exists() and isinstance(input_path, (str, Path)):
        try:
            same = Path(input_path).exists() and path.samefile(input_path)
        except OSError:
            same = False
        if same:
            raise OutputError(f"--out {path} is the input photo; pick another name, or add --force to overwrite it")
    return path, fmt


def save_image(img: Image.Image, path: str | Path, metadata: dict | None = None, quality: int | None = None) -> Path:
    """Save atomically (temp file + rename); the format follows the suffix. ``metadata`` (JSON
    values) is embedded (:func:`read_metadata` reads it back); ``quality`` (1-100) for JPEG/WebP."""
    import json

    from icd_edge.atomic import atomic_file

    path, fmt = check_output_path(path)
    kwargs = {}
    if quality is not None:
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise InputError(f"quality must be an integer in [1, 100], got {quality!r}", param="quality")
        if fmt not in LOSSY:
            raise InputError(f"quality applies to .jpg/.webp outputs, not {path.suffix}", param="quality")
        kwargs["quality"] = quality
    elif fmt in LOSSY:
        kwargs["quality"] = 95
    if metadata is not None:
        text = json.dumps(metadata, ensure_ascii=True, sort_keys=True)
        if fmt == "PNG":
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text(METADATA_KEY, text)
            kwargs["pnginfo"] = info
        elif fmt in ("JPEG", "WEBP", "TIFF"):
            exif = Image.Exif()
            exif[_EXIF_DESCRIPTION] = f"{METADATA_KEY}:{text}"
            kwargs["exif"] = exif.tobytes() if fmt != "TIFF" else exif
    with atomic_file(path) as tmp:
        img.save(tmp, format=fmt, **kwargs)
    return path


def read_metadata(path: str | Path) -> dict | None:
    """The parameters :func:`save_image` embedded in an image, or None if it has none."""
    import json

    try:
        with Image.open(path) as img:
            text = img.info.get(METADATA_KEY) if hasattr(img, "info") else None
            if text is None:
                desc = img.getexif().get(_EXIF_DESCRIPTION)
                if isinstance(desc, str) and desc.startswith(METADATA_KEY + ":"):
                    text = desc[len(METADATA_KEY) + 1 :]
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise ImageError(f"cannot read {path}: {exc}") from None
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) else None


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
