"""An inverted photo (:class:`Inversion`), the source branch cached for re-edits
(:class:`SourceCache`), and their file form (``.npz``, no pickle).

The source row of an edit is the source prompt decoded at w = 0 from x_999: P2P edits only the
target row and local blend leaves the source unchanged, so its trajectory and what the target
borrows from it (per step: its latent, its local-blend maps and, in the layers P2P edits, its
attention queries and keys) are the same for every edit of one inversion. A :class:`SourceCache`
holds those once; every later edit runs the target row alone.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from icd_edge.errors import InputError

FILE_VERSION = 1
_META = "meta"


@dataclass(frozen=True)
class SourceCache:
    """The source row of every reverse step of one inversion (see the module docstring).

    Attributes:
        latents: (N, 1, 4, h, h) the source latent after reverse step k (what local blend keeps).
        maps: (N, 1, Q, 77) the source row's local-blend maps of step k (not summed).
        tensors: (N, S) step k's attention queries/keys of the layers P2P edits, flattened in the
            layout of the bundle's ``unet_reverse_source`` graph (or the compiled path's own).
    Arrays are numpy on the host backends and torch tensors on the compiled GPU path.
    """

    latents: object
    maps: object
    tensors: object

    @property
    def steps(self) -> int:
        return int(self.latents.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held (as stored: float32, or float16 where the path keeps it so)."""
        return sum(_nbytes(a) for a in (self.latents, self.maps, self.tensors))

    def size_report(self) -> dict[str, float]:
        """Size of this cache in MiB as float32 and as float16 (the tensors dominate)."""
        n = sum(int(np.prod(tuple(a.shape))) for a in (self.latents, self.maps, self.tensors))
        return {"fp32_mib": round(4 * n / 2**20, 2), "fp16_mib": round(2 * n / 2**20, 2)}

    def step(self, k: int) -> tuple:
        """(latent after step k, maps of step k, tensors of step k)."""
        return self.latents[k], self.maps[k], self.tensors[k]


def _nbytes(a) -> int:
    n = getattr(a, "nbytes", None)
    if n is None:  # torch
        return a.numel() * a.element_size()
    return int(n)


@dataclass(frozen=True)
class Inversion:
    """A photo encoded to noise by the forward model; reusable for any number of edits.

    Attributes:
        latent: (1, 4, h, w) float32 x_999 (read-only).
        source_prompt: the prompt the photo was inverted with.
        seed: seed of the t = 19 start noise (None when the noise or the latent was given).
        image_size: (width, height) of the input photo.
        bundle_id: the bundle it belongs to (edits with another bundle are refused).
        fit: how the photo was made square (``stretch``, ``crop``, ``pad``), for ``keep_size``.
        rng: where the start noise came from: ``torch``, ``numpy``, ``array`` (given) or
            ``latent`` (made from a known x_999 with :meth:`Editor.inversion_from_latent`).
        source: the source branch of its edits (:class:`SourceCache`), when computed; derived
            data, not part of equality.
    """

    latent: np.ndarray
    source_prompt: str
    seed: int | None
    image_size: tuple[int, int]
    bundle_id: str
    fit: tuple = ("stretch", 0, 0)
    rng: str = "torch"
    source: SourceCache | None = field(default=None, compare=False, repr=False)

    def with_source(self, source: SourceCache | None) -> "Inversion":
        return replace(self, source=source)

    def _attach_source(self, source: SourceCache) -> None:
        # the cache is derived from the fields and never changes what the inversion means, so an
        # editor may fill it on the first edit of an inversion made without it
        object.__setattr__(self, "source", source)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, source: bool = False) -> Path:
        """Write ``path`` (.npz, atomically): x_999, prompt, seed, size, fit, rng, bundle id and
        the file version; with ``source=True`` the source cache too (hundreds of MB at 512 px)."""
        from icd_edge.atomic import atomic_file, check_output_file
        from icd_edge.errors import OutputError

        path = Path(path)
        if path.suffix != ".npz":
            raise InputError(f"an inversion file must end in .npz, got {path}", param="out")
        if source and self.source is None:
            raise InputError(
                "this inversion holds no source cache to save; invert with source_cache=True "
                "(or edit it once) first, or save without the source cache"
            )
        arrays = {"latent": np.asarray(self.latent, np.float32)}
        if source:
            for name, a in zip(("latents", "maps", "tensors"), _host(self.source)):
                arrays[f"source_{name}"] = a
        check_output_file(path, "inversion file", need_bytes=sum(a.nbytes for a in arrays.values()) + (1 << 16))
        meta = {
            "version": FILE_VERSION,
            "source_prompt": self.source_prompt,
            "seed": self.seed,
            "image_size": list(self.image_size),
            "bundle_id": self.bundle_id,
            "fit": list(self.fit),
            "rng": self.rng,
            "source_cache": bool(source),
        }
        arrays[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        try:
            with atomic_file(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
        except OSError as exc:
            from icd_edge.atomic import describe_os_error

            raise OutputError(f"cannot write inversion file {path}: {describe_os_error(exc)}") from None
        return path

    @classmethod
    def load(cls, path: str | Path, bundle_id: str | None = None) -> "Inversion":
        """Read a file written by :meth:`save`; with ``bundle_id``, one made with another bundle is
        refused. A newer file version or a file that is not an inversion is a typed error."""
        path = Path(path)
        where = f"inversion file {path}"
        if not path.is_file():
            raise InputError(f"{where} does not exist; write one with `icd-edge invert --out {path.name}`")
        try:
            # np.load guesses the kind of file from its first bytes (an empty file is an EOFError,
            # a .npy a bare array, anything else "pickled data"): say what it is instead
            with open(path, "rb") as f:
                is_zip = zipfile.is_zipfile(f)
            if not is_zip:
                raise InputError(
                    f"{where} is not an .npz archive (empty, truncated, or another kind of file); "
                    "give a file written by `icd-edge invert`, or invert the photo again"
                )
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                meta = json.loads(bytes(z[_META]).decode()) if _META in names else None
                arrays = {k: z[k] for k in names if k != _META}
        except InputError:
            raise
        except OSError as exc:  # permission, I/O error
            from icd_edge.atomic import describe_os_error

            raise InputError(f"cannot read {where}: {describe_os_error(exc)}") from None
        except (EOFError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise InputError(f"{where} cannot be read ({type(exc).__name__}: {exc}); invert the photo again") from None
        if meta is None:  # outside the try: InputError is a ValueError, which would be re-wrapped
            raise InputError(
                f"{where} is not an icd-edge inversion (no metadata; files of icd-edge "
                "before version 1 of the format cannot be read): invert the photo again"
            )
        version = meta.get("version") if isinstance(meta, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise InputError(f"{where} has no format version; invert the photo again")
        if version > FILE_VERSION:
            raise InputError(
                f"{where} is format version {version}; this icd-edge reads up to {FILE_VERSION}: upgrade icd-edge"
            )
        try:
            inv = cls._from_file(meta, arrays)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"{where} is damaged ({type(exc).__name__}: {exc}); invert the photo again") from None
        if bundle_id is not None and inv.bundle_id != bundle_id:
            raise InputError(
                f"{where} was made with another bundle ({inv.bundle_id[:12]}…, this one is {bundle_id[:12]}…); "
                "invert the photo again with this bundle"
            )
        inv.latent.setflags(write=False)
        return inv

    @classmethod
    def _from_file(cls, meta: dict, arrays: dict) -> "Inversion":
        # every field's type and shape is checked here, so that a damaged file fails on load and
        # not later inside an edit (a two-element fit would break keep_size's unpacking)
        latent = np.asarray(arrays["latent"], np.float32)
        if latent.ndim != 4 or latent.shape[:2] != (1, 4):
            raise ValueError(f"latent of shape {latent.shape}")
        source = None
        if meta.get("source_cache"):
            source = SourceCache(*(np.asarray(arrays[f"source_{n}"]) for n in ("latents", "maps", "tensors")))
            if len({a.shape[0] if a.ndim else -1 for a in (source.latents, source.maps, source.tensors)}) != 1:
                raise ValueError("source cache arrays of different step counts")
            for a in (source.latents, source.maps, source.tensors):
                a.setflags(write=False)  # as a computed cache: the CUDA path keeps read-only feeds on the device
        fit, size, seed = meta["fit"], meta["image_size"], meta["seed"]
        if not (isinstance(fit, list) and len(fit) == 3 and fit[0] in ("stretch", "crop", "pad")):
            raise ValueError(f"fit {fit!r}")
        if not (isinstance(size, list) and len(size) == 2):
            raise ValueError(f"image_size {size!r}")
        if not (seed is None or isinstance(seed, int)):
            raise ValueError(f"seed {seed!r}")
        for key in ("source_prompt", "bundle_id", "rng"):
            if not isinstance(meta[key], str):
                raise TypeError(f"{key} {meta[key]!r} is not text")
        return cls(
            latent,
            meta["source_prompt"],
            seed,
            (int(size[0]), int(size[1])),
            meta["bundle_id"],
            (fit[0], int(fit[1]), int(fit[2])),
            meta["rng"],
            source,
        )


def _host(cache: SourceCache) -> tuple[np.ndarray, ...]:
    out = []
    for a in (cache.latents, cache.maps, cache.tensors):
        if hasattr(a, "detach"):  # torch, on any device
            a = a.detach().float().cpu().numpy()
        out.append(np.asarray(a))
    return tuple(out)
