"""The manifest as typed, frozen data: what the export writes and every runtime module reads.

``Manifest.from_json`` validates types, required keys and ranges (one :class:`BundleError` naming
the first bad key) and reads the previous schema version; ``to_json`` writes the current one.
Sections the runtime does not interpret (sources, tool versions, the export's own record) are
kept as plain JSON in ``Manifest.info`` so a bundle round-trips unchanged.

Schema versions: 1 kept parity as nested per-check objects; 2 keeps one list of
:class:`ParityEntry` (every backend and precision compared with the torch reference, alike).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from icd_edge.errors import BundleError

SCHEMA_VERSION = 2
FAMILIES = ("sd15", "sdxl")
READABLE_VERSIONS = (1, 2)
FORMAT = "icd_edge.bundle"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# manifest keys with a typed home below; every other top-level key lands in Manifest.info
_TYPED = {
    "format",
    "schema_version",
    "complete",
    "model",
    "dims",
    "schedule",
    "guidance",
    "vae",
    "unet_weights",
    "p2p",
    "tokenizer",
    "graphs",
    "int8_scheme",
    "added_cond",
    "parity",
    "files",
}


class _Bad(Exception):
    def __init__(self, key: str, expected: str):
        super().__init__(key, expected)
        self.key, self.expected = key, expected


def _get(d, key: str, path: str):
    if not isinstance(d, dict):
        raise _Bad(path or "manifest", "an object")
    if key not in d:
        raise _Bad(f"{path}.{key}" if path else key, "present")
    return d[key]


def _obj(v, path: str) -> dict:
    if not isinstance(v, dict):
        raise _Bad(path, "an object")
    return v


def _num(v, path: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise _Bad(path, "a positive number" if positive else "a finite number")
    return float(v)


def _int(v, path: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _Bad(path, f"an integer ≥ {minimum}")
    return v


def _list(v, path: str, length: int | None = None, nonempty: bool = False) -> list:
    if not isinstance(v, list) or (length is not None and len(v) != length) or (nonempty and not v):
        raise _Bad(
            path, f"a list of {length} items" if length is not None else "a non-empty list" if nonempty else "a list"
        )
    return v


def _bool(v, path: str) -> bool:
    if not isinstance(v, bool):
        raise _Bad(path, "true or false")
    return v


def _str(v, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise _Bad(path, "a non-empty string")
    return v


def _opt_str(d: dict, key: str, path: str) -> str | None:
    return None if d.get(key) is None else _str(d[key], f"{path}.{key}")


def _opt(d: dict, key: str, path: str, check, default):
    """``check(d[key], path.key)`` when the key is there and not null, else ``default``."""
    return default if d.get(key) is None else check(d[key], f"{path}.{key}" if path else key)


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class IOSpec:
    """A graph input or output with its concrete shape (the bundle's dims resolved)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Artifact:
    """One graph in one format: ``file`` (a graph file or a package folder), ``weights`` (external
    weights), ``dir`` (a folder of weights), the ``precision`` it was stored in, and the format's
    own keys (``details``: opset, fp16 method, engine key, ...)."""

    precision: str = "fp32"
    file: str | None = None
    weights: str | None = None
    dir: str | None = None
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {k: v for k, v in (("file", self.file), ("weights", self.weights), ("dir", self.dir)) if v is not None}
        return {**out, "precision": self.precision, **self.details}


@dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    artifacts: dict[str, Artifact] = field(default_factory=dict)

    def io_json(self) -> tuple[list[dict], list[dict]]:
        return [s.to_json() for s in self.inputs], [s.to_json() for s in self.outputs]

    def to_json(self) -> dict:
        ins, outs = self.io_json()
        return {"inputs": ins, "outputs": outs, "artifacts": {k: a.to_json() for k, a in self.artifacts.items()}}


@dataclass(frozen=True)
class Step:
    """One consistency step t → s with its coefficients: x_s = c1·x_t + c2·ε̂."""

    t: int
    s: int
    c1: float
    c2: float


@dataclass(frozen=True)
class Schedule:
    config: str
    forward: tuple[Step, ...]
    reverse: tuple[Step, ...]
    alpha_sigma: dict[int, tuple[float, float]]  # (√ᾱ_t, √(1−ᾱ_t)) of every timestep used
    encoder_start_t: int
    encoder_start: tuple[float, float]
    info: dict = field(default_factory=dict)  # provenance (alphas_cumprod source, prediction type)

    def to_json(self) -> dict:
        return {
            "config": self.config,
            "forward": [[st.t, st.s] for st in self.forward],
            "reverse": [[st.t, st.s] for st in self.reverse],
            "alpha_sigma": {str(t): list(v) for t, v in self.alpha_sigma.items()},
            "coefficients": {
                "forward": [[st.c1, st.c2] for st in self.forward],
                "reverse": [[st.c1, st.c2] for st in self.reverse],
            },
            "encoder_start": {"t": self.encoder_start_t, "alpha_sigma": list(self.encoder_start)},
            **self.info,
        }


@dataclass(frozen=True)
class Guidance:
    dim: int
    max: float
    embeddings: dict[str, tuple[float, ...]]  # torch-computed rows of the trained w values
    trained: tuple[float, ...] = ()
    defaults: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "dim": self.dim,
            "max": self.max,
            "trained": list(self.trained),
            "embeddings": {k: list(v) for k, v in self.embeddings.items()},
            "defaults": self.defaults,
        }


@dataclass(frozen=True)
class P2P:
    blend_threshold: float
    blend_hw: int | None = None
    self_inject_max_keys: int | None = None

    def to_json(self) -> dict:
        out = {"blend_threshold": self.blend_threshold}
        if self.blend_hw is not None:
            out["blend_hw"] = self.blend_hw
        if self.self_inject_max_keys is not None:
            out["self_inject_max_keys"] = self.self_inject_max_keys
        return out


@dataclass(frozen=True)
class Int8Scheme:
    """How int8 weights were quantised: ``weight_max`` 64 (7-bit, exact on every x86 CPU) or 127."""

    weight_max: int
    weight_range: str = ""
    exact_without_vnni: bool = False
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "weight_max": self.weight_max,
            "weight_range": self.weight_range,
            "exact_without_vnni": self.exact_without_vnni,
            **self.info,
        }

    @classmethod
    def from_json(cls, s: dict) -> "Int8Scheme":
        s = _obj(s, "int8_scheme")
        return cls(
            _int(_get(s, "weight_max", "int8_scheme"), "int8_scheme.weight_max", 1),
            _opt(s, "weight_range", "int8_scheme", _str, ""),
            _opt(s, "exact_without_vnni", "int8_scheme", _bool, False),
            {k: v for k, v in s.items() if k not in ("weight_max", "weight_range", "exact_without_vnni")},
        )


CHECKS = ("graph", "edit", "reedit", "generate")  # reedit: an edit through the source cache


@dataclass(frozen=True)
class ParityEntry:
    """One comparison with the torch fp32 reference.

    ``check`` is ``graph`` (one graph on fixed inputs; ``target`` names it), ``edit`` (invert +
    Prompt-to-Prompt edit, decoded image; ``target`` names the photo case) or ``generate``.
    ``error`` is set instead of the metrics when the backend failed the case (e.g. NaN)."""

    check: str
    target: str
    backend: str
    precision: str
    psnr_db: float | None = None
    max_abs_err: float | None = None
    gate_db: float | None = None
    error: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def meets_gate(self) -> bool | None:
        if self.gate_db is None:
            return None
        return self.error is None and self.psnr_db is not None and self.psnr_db >= self.gate_db

    def to_json(self) -> dict:
        out = {"check": self.check, "target": self.target, "backend": self.backend, "precision": self.precision}
        for key in ("psnr_db", "max_abs_err", "gate_db", "error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **self.details}


@dataclass(frozen=True)
class Parity:
    reference: str = "torch eager fp32"
    entries: tuple[ParityEntry, ...] = ()
    info: dict = field(default_factory=dict)

    def find(self, check: str, target: str | None = None, backend: str = "onnxruntime") -> list[ParityEntry]:
        return [
            e
            for e in self.entries
            if e.check == check and e.backend == backend and (target is None or e.target == target)
        ]

    def get(self, check: str, target: str, backend: str = "onnxruntime") -> ParityEntry | None:
        hits = self.find(check, target, backend)
        return hits[0] if hits else None

    def backends(self) -> list[str]:
        return sorted({e.backend for e in self.entries})

    def edit_mean_psnr_db(self, backend: str = "onnxruntime") -> float | None:
        vals = [e.psnr_db for e in self.find("edit", backend=backend) if e.psnr_db is not None]
        return round(sum(vals) / len(vals), 2) if vals else None

    def to_json(self) -> dict:
        return {"reference": self.reference, **self.info, "entries": [e.to_json() for e in self.entries]}


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``manifest.json``, typed. ``info`` holds the untyped, informational sections."""

    model: str
    family: str  # "sd15" or "sdxl"
    dims: dict[str, int]
    schedule: Schedule
    guidance: Guidance
    vae_scaling_factor: float
    p2p: P2P | None  # None for SDXL (its edit switches prompts)
    tokenizer_file: str
    graphs: dict[str, Graph]
    files: dict[str, FileEntry] = field(default_factory=dict)
    unet_weights: str = "fused"
    int8_scheme: Int8Scheme | None = None
    parity: Parity = Parity()
    complete: bool = False
    tokenizer_max_length: int = 77
    info: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # SDXL: the second tokenizer, the UNets' time_ids, and how its VAE is used (SD1.5 encodes the
    # posterior mean and truncates decoded pixels; SDXL samples the posterior and rounds)
    tokenizer_2_file: str | None = None
    tokenizer_2_pad: str | None = None  # its pad token when not the end token (SDXL-base: "!")
    time_ids: tuple[float, ...] | None = None
    vae_encode: str = "mean"  # or "sample"
    vae_to_uint8: str = "truncate"  # or "round"

    @property
    def image_hw(self) -> int:
        return self.dims["H"]

    @property
    def latent_hw(self) -> int:
        return self.dims["h"]

    def with_(self, **changes) -> "Manifest":
        return replace(self, **changes)

    def to_json(self) -> dict:
        out = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "complete": self.complete,
            **self.info,
            "model": {"name": self.model, "family": self.family},
            "dims": dict(self.dims),
            "schedule": self.schedule.to_json(),
            "guidance": self.guidance.to_json(),
            "vae": {
                "scaling_factor": self.vae_scaling_factor,
                "encode": self.vae_encode,
                "to_uint8": self.vae_to_uint8,
            },
            "unet_weights": self.unet_weights,
            "tokenizer": {"file": self.tokenizer_file, "max_length": self.tokenizer_max_length},
            "graphs": {name: g.to_json() for name, g in self.graphs.items()},
        }
        if self.p2p is not None:
            out["p2p"] = self.p2p.to_json()
        if self.tokenizer_2_file is not None:
            out["tokenizer"]["file_2"] = self.tokenizer_2_file
        if self.tokenizer_2_pad is not None:
            out["tokenizer"]["pad_token_2"] = self.tokenizer_2_pad
        if self.time_ids is not None:
            out["added_cond"] = {"time_ids": list(self.time_ids)}
        if self.int8_scheme is not None:
            out["int8_scheme"] = self.int8_scheme.to_json()
        out["parity"] = self.parity.to_json()
        out["files"] = {k: {"bytes": f.bytes, "sha256": f.sha256} for k, f in self.files.items()}
        return out

    @classmethod
    def from_json(cls, m: dict, where: str = "manifest.json") -> "Manifest":
        """Parse and validate; raises :class:`BundleError` naming the first malformed key."""
        try:
            return _parse(m)
        except _Bad as bad:
            raise BundleError(
                f"{where}: {bad.key} must be {bad.expected}; the manifest is malformed, re-export the bundle"
            ) from None


# ----------------------------------------------------------------------------- parsing


def _tensor_specs(v, path: str) -> tuple[IOSpec, ...]:
    out = []
    for i, spec in enumerate(_list(v, path, nonempty=True)):
        p = f"{path}[{i}]"
        shape = tuple(_int(d, f"{p}.shape[{j}]", 1) for j, d in enumerate(_list(_get(spec, "shape", p), f"{p}.shape")))
        out.append(IOSpec(_str(_get(spec, "name", p), f"{p}.name"), _str(_get(spec, "dtype", p), f"{p}.dtype"), shape))
    return tuple(out)


def _parse(m: dict) -> Manifest:
    _obj(m, "manifest")
    version = m.get("schema_version")
    files_raw = _obj(_get(m, "files", ""), "files")
    files = {}
    for rel, meta in files_raw.items():
        size = _int(_get(meta, "bytes", f"files[{rel!r}]"), f"files[{rel!r}].bytes")
        digest = _get(meta, "sha256", f"files[{rel!r}]")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise _Bad(f"files[{rel!r}].sha256", "64 lowercase hex digits")
        files[rel] = FileEntry(size, digest)

    def listed(rel, path, folder_ok=False):
        _str(rel, path)
        if rel not in files and not (folder_ok and any(k.startswith(rel.rstrip("/") + "/") for k in files)):
            raise _Bad(path, f"a file of the file table (it names {rel!r}, which is not size- and hash-checked)")
        return rel

    dims_raw = _obj(_get(m, "dims", ""), "dims")
    for key in ("H", "h"):
        _int(_get(dims_raw, key, "dims"), f"dims.{key}", 1)
    dims = {key: _int(value, f"dims.{key}", 1) for key, value in dims_raw.items()}
    model = _obj(_get(m, "model", ""), "model")

    sched = _obj(_get(m, "schedule", ""), "schedule")
    coeff = _get(sched, "coefficients", "schedule")
    table_raw = _obj(_get(sched, "alpha_sigma", "schedule"), "schedule.alpha_sigma")
    table = {}
    for t, pair in table_raw.items():
        if not str(t).isdigit():
            raise _Bad(f"schedule.alpha_sigma[{t!r}]", "keyed by an integer timestep")
        table[int(t)] = tuple(
            _num(v, f"schedule.alpha_sigma[{t!r}][{j}]")
            for j, v in enumerate(_list(pair, f"schedule.alpha_sigma[{t!r}]", 2))
        )
    steps = {}
    for direction in ("forward", "reverse"):
        ts = _list(_get(sched, direction, "schedule"), f"schedule.{direction}", nonempty=True)
        cs = _list(_get(coeff, direction, "schedule.coefficients"), f"schedule.coefficients.{direction}", len(ts))
        out = []
        for i, (pair, c) in enumerate(zip(ts, cs)):
            t, s = (
                _int(v, f"schedule.{direction}[{i}][{j}]")
                for j, v in enumerate(_list(pair, f"schedule.{direction}[{i}]", 2))
            )
            c1, c2 = (
                _num(v, f"schedule.coefficients.{direction}[{i}][{j}]")
                for j, v in enumerate(_list(c, f"schedule.coefficients.{direction}[{i}]", 2))
            )
            if direction == "reverse" and t not in table:
                raise _Bad(f"schedule.alpha_sigma[{str(t)!r}]", "present (a reverse timestep)")
            out.append(Step(t, s, c1, c2))
        steps[direction] = tuple(out)
    start = _obj(_get(sched, "encoder_start", "schedule"), "schedule.encoder_start")
    start_as = tuple(
        _num(v, f"schedule.encoder_start.alpha_sigma[{j}]")
        for j, v in enumerate(
            _list(_get(start, "alpha_sigma", "schedule.encoder_start"), "schedule.encoder_start.alpha_sigma", 2)
        )
    )
    schedule = Schedule(
        _str(_get(sched, "config", "schedule"), "schedule.config"),
        steps["forward"],
        steps["reverse"],
        table,
        _opt(start, "t", "schedule.encoder_start", _int, 19),
        start_as,
        {
            k: v
            for k, v in sched.items()
            if k not in ("config", "forward", "reverse", "alpha_sigma", "coefficients", "encoder_start")
        },
    )

    g = _obj(_get(m, "guidance", ""), "guidance")
    dim = _int(_get(g, "dim", "guidance"), "guidance.dim", 1)
    emb = {
        w: tuple(
            _num(v, f"guidance.embeddings[{w!r}][{j}]")
            for j, v in enumerate(_list(row, f"guidance.embeddings[{w!r}]", dim))
        )
        for w, row in _obj(_get(g, "embeddings", "guidance"), "guidance.embeddings").items()
    }
    trained = _opt(g, "trained", "guidance", _list, [])
    guidance = Guidance(
        dim,
        _num(_get(g, "max", "guidance"), "guidance.max"),
        emb,
        tuple(_num(v, f"guidance.trained[{i}]") for i, v in enumerate(trained)),
        dict(_opt(g, "defaults", "guidance", _obj, {})),
    )

    family = _opt(model, "family", "model", _str, "sd15")
    if family not in FAMILIES:
        raise _Bad("model.family", f"one of {', '.join(FAMILIES)}")
    p2p = None
    if family == "sd15" or m.get("p2p") is not None:
        p2p_raw = _obj(_get(m, "p2p", ""), "p2p")
        p2p = P2P(
            _num(_get(p2p_raw, "blend_threshold", "p2p"), "p2p.blend_threshold"),
            _opt(p2p_raw, "blend_hw", "p2p", _int, None),
            _opt(p2p_raw, "self_inject_max_keys", "p2p", _int, None),
        )
    tok = _obj(_get(m, "tokenizer", ""), "tokenizer")
    time_ids = None
    if family == "sdxl":
        cond = _obj(_get(m, "added_cond", ""), "added_cond")
        time_ids = tuple(
            _num(v, f"added_cond.time_ids[{i}]")
            for i, v in enumerate(_list(_get(cond, "time_ids", "added_cond"), "added_cond.time_ids", 6))
        )
        _get(tok, "file_2", "tokenizer")
    vae_raw = _obj(_get(m, "vae", ""), "vae")
    vae_encode = _opt(vae_raw, "encode", "vae", _str, "mean")
    vae_to_uint8 = _opt(vae_raw, "to_uint8", "vae", _str, "truncate")
    if vae_encode not in ("mean", "sample"):
        raise _Bad("vae.encode", "mean or sample")
    if vae_to_uint8 not in ("truncate", "round"):
        raise _Bad("vae.to_uint8", "truncate or round")

    graphs_raw = _get(m, "graphs", "")
    if not isinstance(graphs_raw, dict) or not graphs_raw:
        raise _Bad("graphs", "a non-empty object")
    graphs = {}
    for name, gr in graphs_raw.items():
        path = f"graphs.{name}"
        arts_raw = _get(gr, "artifacts", path)
        if not isinstance(arts_raw, dict) or not arts_raw:
            raise _Bad(f"{path}.artifacts", "a non-empty object")
        arts = {}
        for fmt, art in arts_raw.items():
            apath = f"{path}.artifacts.{fmt}"
            _obj(art, apath)
            for key in ("file", "weights"):
                if art.get(key) is not None:  # a Core ML package is a folder of listed files
                    listed(art[key], f"{apath}.{key}", folder_ok=key == "file")
            if art.get("dir") is not None:
                prefix = _str(art["dir"], f"{apath}.dir").rstrip("/") + "/"
                if not any(rel.startswith(prefix) for rel in files):
                    raise _Bad(f"{apath}.dir", "a folder holding files of the file table")
            precision = art.get("precision", "fp32")
            arts[fmt] = Artifact(
                _str(precision, f"{apath}.precision"),
                _opt_str(art, "file", apath),
                _opt_str(art, "weights", apath),
                _opt_str(art, "dir", apath),
                {k: v for k, v in art.items() if k not in ("file", "weights", "dir", "precision")},
            )
        graphs[name] = Graph(
            name,
            _tensor_specs(_get(gr, "inputs", path), f"{path}.inputs"),
            _tensor_specs(_get(gr, "outputs", path), f"{path}.outputs"),
            arts,
        )

    scheme = None if m.get("int8_scheme") is None else Int8Scheme.from_json(m["int8_scheme"])
    parity = _parity(m.get("parity"), version)
    return Manifest(
        model=_str(_get(model, "name", "model"), "model.name"),
        family=family,
        dims=dims,
        schedule=schedule,
        guidance=guidance,
        vae_scaling_factor=_num(_get(vae_raw, "scaling_factor", "vae"), "vae.scaling_factor", positive=True),
        vae_encode=vae_encode,
        vae_to_uint8=vae_to_uint8,
        p2p=p2p,
        tokenizer_file=listed(_get(tok, "file", "tokenizer"), "tokenizer.file"),
        tokenizer_2_file=None if tok.get("file_2") is None else listed(tok["file_2"], "tokenizer.file_2"),
        tokenizer_2_pad=_opt_str(tok, "pad_token_2", "tokenizer"),
        time_ids=time_ids,
        tokenizer_max_length=_opt(tok, "max_length", "tokenizer", _int, 77),
        graphs=graphs,
        files=files,
        unet_weights=_opt(m, "unet_weights", "", _str, "fused"),
        int8_scheme=scheme,
        parity=parity,
        complete=m.get("complete") is True,
        info={k: v for k, v in m.items() if k not in _TYPED},
        schema_version=version if isinstance(version, int) else SCHEMA_VERSION,
    )


def _entry(raw: dict, path: str) -> ParityEntry:
    _obj(raw, path)
    check = _str(_get(raw, "check", path), f"{path}.check")
    if check not in CHECKS:
        raise _Bad(f"{path}.check", f"one of {', '.join(CHECKS)}")
    metrics = {}
    for key in ("psnr_db", "max_abs_err", "gate_db"):
        if raw.get(key) is not None:
            metrics[key] = _num(raw[key], f"{path}.{key}")
    return ParityEntry(
        check,
        _str(_get(raw, "target", path), f"{path}.target"),
        _str(_get(raw, "backend", path), f"{path}.backend"),
        _str(_get(raw, "precision", path), f"{path}.precision"),
        **metrics,
        error=None if raw.get("error") is None else str(raw["error"]),
        details={
            k: v
            for k, v in raw.items()
            if k not in ("check", "target", "backend", "precision", "psnr_db", "max_abs_err", "gate_db", "error")
        },
    )


def _parity(raw, version) -> Parity:
    if raw is None:
        return Parity()
    raw = _obj(raw, "parity")
    if version == 1:
        return parity_from_v1(raw)
    entries = tuple(
        _entry(e, f"parity.entries[{i}]") for i, e in enumerate(_list(raw.get("entries", []), "parity.entries"))
    )
    return Parity(
        str(raw.get("reference", "torch eager fp32")),
        entries,
        {k: v for k, v in raw.items() if k not in ("reference", "entries")},
    )


def parity_from_v1(raw: dict) -> Parity:
    """Schema 1's nested parity ({graphs: {name: ...}, end_to_end: {edit, edit_<case>, generate,
    openvino: {...}}}) as entries. Informational there, so a malformed part is dropped, not fatal."""
    entries = []
    for name, g in (raw.get("graphs") or {}).items() if isinstance(raw.get("graphs"), dict) else ():
        if isinstance(g, dict) and isinstance(g.get("psnr_db"), (int, float)):
            entries.append(
                ParityEntry(
                    "graph",
                    name,
                    str(g.get("backend", "onnxruntime")),
                    str(g.get("precision", "fp32")),
                    float(g["psnr_db"]),
                    _maybe(g.get("max_abs_err")),
                    details=_keep(g, ("outputs",)),
                )
            )
    e2e = raw.get("end_to_end") if isinstance(raw.get("end_to_end"), dict) else {}
    gate = _maybe(e2e.get("gate_db"))

    def cases(block, backend, precision):
        for key, v in block.items():
            if not isinstance(v, dict) or not isinstance(v.get("psnr_db"), (int, float)):
                continue
            if key == "generate":
                check, target = "generate", "synthetic"
            elif key == "edit" or key.startswith("edit_"):
                check, target = "edit", "synthetic" if key == "edit" else key[5:]
            else:
                continue
            entries.append(
                ParityEntry(
                    check,
                    target,
                    str(v.get("backend", backend)),
                    str(v.get("precision", precision)),
                    float(v["psnr_db"]),
                    _maybe(v.get("max_abs_err")),
                    gate,
                    details=_keep(v, ("source", "target"), rename={"target": "target_prompt"}),
                )
            )

    if e2e:
        base = e2e.get("edit") if isinstance(e2e.get("edit"), dict) else {}
        cases(e2e, "onnxruntime", str(base.get("precision", "fp32")))
        ov = e2e.get("openvino")
        if isinstance(ov, dict):
            if "error" in ov:
                entries.append(
                    ParityEntry(
                        "edit",
                        "synthetic",
                        "openvino",
                        str(ov.get("precision", "auto")),
                        gate_db=gate,
                        error=str(ov["error"]),
                        details={"version": ov.get("version")},
                    )
                )
            else:
                before = len(entries)
                cases(ov, "openvino", str(ov.get("precision", "auto")))
                for i in range(before, len(entries)):
                    entries[i] = replace(
                        entries[i],
                        details={
                            **entries[i].details,
                            "version": ov.get("version"),
                            "inference_precision": ov.get("inference_precision"),
                        },
                    )
    info = {"reference": raw["reference"]} if isinstance(raw.get("reference"), str) else {}
    if isinstance(e2e.get("case"), dict):
        info["case"] = e2e["case"]
    return Parity(info.pop("reference", "torch eager fp32"), tuple(entries), info)


def _maybe(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _keep(d: dict, keys: tuple, rename: dict | None = None) -> dict[str, Any]:
    rename = rename or {}
    return {rename.get(k, k): d[k] for k in keys if k in d}
