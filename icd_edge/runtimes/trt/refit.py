"""The "shared base" refit map: which weights differ between ``unet_forward`` and ``unet_reverse``.

iCD's forward and reverse models are one teacher UNet with two different LoRAs fused in, so
their ONNX graphs have the same topology and differ only in (most of) the weights the LoRAs
touch. With ``shared_base=True`` the TensorRT backend builds one refittable engine from
``unet_forward`` and refits it with the reverse weights (and back) when the other graph is
asked for; TensorRT's ONNX parser names engine weights after ONNX initializers.

The two graphs are exported separately, so an initializer's name need not be equal in both
(the dynamo exporter numbers folded constants ``val_<n>``). Initializers are therefore
matched by position in the graph: (index of the first node that reads it, that node's op type,
input slot). A matched pair whose names are equal is the usual case; the map records both.

The map is computed once per pair of ONNX files (it needs the ``onnx`` package and hashes the
weights) and is plain JSON: for every matched weight, its dtype and shape and where each
side's bytes are (a bundle file, offset and length, or the bytes inline for small tensors).
At refit time :func:`load_weights` reads them with numpy, without onnx.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path, PurePosixPath

import numpy as np

from icd_edge.errors import BackendUnavailable, BundleError

MAP_SCHEMA = 1


def _initializer_positions(graph) -> dict[str, tuple[int, str, int]]:
    names = {t.name for t in graph.initializer}
    pos: dict[str, tuple[int, str, int]] = {}
    for i, node in enumerate(graph.node):
        for j, x in enumerate(node.input):
            if x in names and x not in pos:
                pos[x] = (i, node.op_type, j)
    return pos


def _ref(tensor, onnx_rel: str, bundle_root: Path) -> tuple[dict, str]:
    """(where the tensor's bytes are, sha256 of them) without loading external data whole."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        rel = (PurePosixPath(onnx_rel).parent / info["location"]).as_posix()
        offset, length = int(info.get("offset", 0)), int(info["length"])
        h = hashlib.sha256()
        with open(bundle_root / rel, "rb") as f:
            f.seek(offset)
            remaining = length
            while remaining:
                block = f.read(min(remaining, 1 << 22))
                if not block:
                    raise BundleError(f"{rel} ends before {tensor.name} ({offset}+{length}); re-export the bundle")
                h.update(block)
                remaining -= len(block)
        return {"file": rel, "offset": offset, "length": length}, h.hexdigest()
    raw = np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes()
    return {"inline": base64.b64encode(raw).decode("ascii")}, hashlib.sha256(raw).hexdigest()


def refit_weight_map(bundle_root: str | Path, forward_onnx: str, reverse_onnx: str) -> dict:
    """Match the initializers of two same-topology ONNX graphs and mark the ones that differ.

    Args:
        bundle_root: the bundle folder.
        forward_onnx, reverse_onnx: bundle paths of the two graphs (the engine is built from the first).

    Returns:
        ``{"schema", "forward", "reverse", "weights": [{"name", "reverse_name", "dtype", "shape",
        "differs", "forward": ref, "reverse": ref}, ...]}`` where ``name`` is the forward graph's
        initializer name (= the engine's weight name).

    Raises:
        BundleError: the graphs do not have the same topology.
    """
    import onnx
    from onnx import helper

    root = Path(bundle_root)
    fwd = onnx.load(str(root / forward_onnx), load_external_data=False).graph
    rev = onnx.load(str(root / reverse_onnx), load_external_data=False).graph
    f_ops, r_ops = [n.op_type for n in fwd.node], [n.op_type for n in rev.node]
    if f_ops != r_ops:
        first = next((i for i, (a, b) in enumerate(zip(f_ops, r_ops)) if a != b), min(len(f_ops), len(r_ops)))
        raise BundleError(
            f"{forward_onnx} and {reverse_onnx} do not have the same topology ({len(f_ops)} vs {len(r_ops)} "
            f"nodes, first difference at node {first}); a shared refittable engine is not possible, "
            "use shared_base=False"
        )
    f_pos, r_pos = _initializer_positions(fwd), _initializer_positions(rev)
    r_by_pos = {p: name for name, p in r_pos.items()}
    r_tensors = {t.name: t for t in rev.initializer}
    weights = []
    for t in fwd.initializer:
        if t.name not in f_pos:
            continue  # not read by any node
        r_name = r_by_pos.get(f_pos[t.name])
        if r_name is None:
            raise BundleError(
                f"initializer {t.name} of {forward_onnx} has no counterpart in {reverse_onnx}; use shared_base=False"
            )
        rt = r_tensors[r_name]
        if list(t.dims) != list(rt.dims) or t.data_type != rt.data_type:
            raise BundleError(
                f"initializer {t.name} is {list(t.dims)} in {forward_onnx} but {r_name} is {list(rt.dims)} "
                f"in {reverse_onnx}; use shared_base=False"
            )
        f_ref, f_sha = _ref(t, forward_onnx, root)
        r_ref, r_sha = _ref(rt, reverse_onnx, root)
        weights.append(
            {
                "name": t.name,
                "reverse_name": r_name,
                "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name,
                "shape": [int(d) for d in t.dims],
                "differs": f_sha != r_sha,
                "forward": f_ref,
                "reverse": r_ref,
            }
        )
    return {"schema": MAP_SCHEMA, "forward": forward_onnx, "reverse": reverse_onnx, "weights": weights}


def differing(refit_map: dict) -> list[str]:
    """Engine weight names whose forward and reverse values differ."""
    return [w["name"] for w in refit_map["weights"] if w["differs"]]


def load_weights(bundle_root: str | Path, refit_map: dict, side: str, names) -> dict[str, np.ndarray]:
    """The ``side`` (``"forward"`` or ``"reverse"``) values of the named weights, as numpy arrays."""
    if side not in ("forward", "reverse"):
        raise ValueError(f"side must be 'forward' or 'reverse', got {side!r}")
    root = Path(bundle_root)
    table = {w["name"]: w for w in refit_map["weights"]}
    out = {}
    for name in names:
        if name not in table:
            raise BackendUnavailable(
                f"TensorRT asks for weight {name!r}, which the shared-base refit map does not know; "
                "use shared_base=False"
            )
        w = table[name]
        ref, dtype = w[side], np.dtype(w["dtype"])
        if "inline" in ref:
            arr = np.frombuffer(base64.b64decode(ref["inline"]), dtype=dtype)
        else:
            arr = np.fromfile(
                root / ref["file"], dtype=dtype, count=ref["length"] // dtype.itemsize, offset=ref["offset"]
            )
        out[name] = np.ascontiguousarray(arr.reshape(w["shape"]))
    return out
