"""int8 calibration: activations recorded along the real iCD trajectories (forward t =
19/259/519/779 with w = 0, reverse 999/779/519/259 for both rows of the edit batch, and the re-edit graphs' source and
target rows) of the
calibration photos, and the min/max ranges of the quantised ops' tensors over them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from icd_edge.errors import ExportError

CALIBRATION = (  # scikit-image's public-domain photos: (name, source prompt, target prompt, blend words)
    ("chelsea", "a photo of a cat", "a photo of a dog", ("cat", "dog")),
    ("astronaut", "a photo of an astronaut", "a photo of a robot", ("astronaut", "robot")),
    ("coffee", "a cup of coffee", "a cup of tea", ("coffee", "tea")),
)


def read_prompts(directory: Path) -> dict[str, tuple[str, str]]:
    """The optional ``prompts.json`` of a calibration folder: ``{file name: [source, target]}``,
    checked (a typed error that says what was expected, before any model loads)."""
    path = directory / "prompts.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not readable JSON ({exc}); expected {{file name: [source, target]}}") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{path} must be an object {{file name: [source, target]}}, got {type(raw).__name__}")
    out = {}
    for name, pair in raw.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)):
            raise ExportError(
                f"{path}: {name!r} must map to [source prompt, target prompt] (two non-empty strings), got {pair!r}"
            )
        out[name] = (pair[0], pair[1])
    return out


def calibration_cases(directory: Path | None, side: int, limit: int) -> list[tuple]:
    """(image array, source, target, blend) cases: a user folder, else scikit-image's photos."""
    from icd_edge.image import load_image

    cases = []
    if directory is not None:
        prompts = read_prompts(directory)
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ExportError(f"--calibration {directory} holds no images (.png, .jpg, .webp, .bmp)")
        for p in files[:limit]:
            src, tgt = prompts.get(p.name, ("a photo", "a painting"))
            cases.append((np.asarray(load_image(p)), src, tgt, None))
        return cases
    try:
        import skimage.data
    except ImportError as exc:
        raise ExportError(
            "int8 calibration needs photos: install scikit-image (its public-domain photos are the "
            "default set) or pass --calibration DIR"
        ) from exc
    for name, src, tgt, blend in CALIBRATION[:limit]:
        cases.append((getattr(skimage.data, name)(), src, tgt, blend))
    return cases


class _Recorder:
    """Wraps a backend and keeps every feed each graph receives."""

    def __init__(self, backend):
        self.backend, self.name, self.fmt = backend, backend.name, backend.fmt
        self.memory_policies = backend.memory_policies
        self.feeds: dict[str, list[dict]] = {}

    def probe(self):
        return self.backend.probe()

    def configure(self, bundle, memory: str) -> None:
        self.backend.configure(bundle, memory)

    def open_session(self, bundle, graph):
        inner = self.backend.open_session(bundle, graph)
        rec = self.feeds.setdefault(graph, [])

        class Session:
            def run(self_, feeds):
                rec.append({k: np.array(v) for k, v in feeds.items()})
                return inner.run(feeds)

            def close(self_):
                inner.close()

        return Session()


def record_trajectories(bundle, graphs, cases) -> dict[str, list[dict]]:
    """Run invert + edit (and a reconstruction) on the torch reference, recording each graph's feeds."""
    from icd_edge.edit.editor import Editor
    from icd_edge.runtimes.torch_ref import TorchBackend

    rec = _Recorder(TorchBackend(graphs))
    ed = Editor(bundle, rec)  # with the re-edit graphs: the source pass and the target-only edit
    batch2 = Editor(bundle, rec, source_cache="off") if ed.source_cache != "off" else None
    xl = bundle.manifest.family == "sdxl"
    for image, src, tgt, blend in cases:
        inv = ed.invert(image, src, seed=0)
        if xl:  # the prompt switch at the official settings
            ed.edit(inv, tgt, output_type="np")
        else:
            ed.edit(inv, tgt, cross_replace=0.4, self_replace=0.6, blend=blend, output_type="np")
        if batch2 is not None:  # and the batch-2 edit graph on the same trajectory
            batch2.edit(inv, tgt, cross_replace=0.4, self_replace=0.6, blend=blend, output_type="np")
        ed.reconstruct(inv, output_type="np")
    feeds = rec.feeds
    if "taesd_decoder" in graphs and not feeds.get("taesd_decoder"):
        # the editor decoded with the full VAE: TAESD sees the same final latents, unscaled
        feeds["taesd_decoder"] = [
            {"latent": f["latent"] * np.float32(ed.constants.vae_scale)} for f in feeds.get("vae_decoder", [])
        ]
    return feeds


def calibrate_ranges(src: Path, calibration: list[dict], op_types, exclude=()) -> dict[str, tuple[float, float]]:
    """Min/max of every float input and output of the ``op_types`` nodes (but ``exclude``) over the
    calibration feeds: what ONNX Runtime's MinMax calibrator computes, with one copy of the weights.

    Its calibrator holds the model proto, a deep copy, the augmented copy and an unoptimised session
    at once (17.5 GB for a batch-1 UNet at 512 px; the batch-2 edit UNet did not fit in 24 GB).
    Here the graph is augmented without its weights (ReduceMin/ReduceMax per tensor, so a run returns
    scalars), handed to ONNX Runtime as bytes that read the original weight files, and run one feed
    at a time in a session without the memory arena."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    skip = set(exclude)
    tensors = sorted(
        {
            t
            for n in graph.node
            if n.op_type in op_types and n.name not in skip
            for t in [*n.input, *n.output]
            if t and t not in weights
        }
    )
    if not tensors:
        return {}
    del graph.output[:]
    for k, t in enumerate(tensors):
        for red in ("Min", "Max"):
            out = f"icd_calib_{k}_{red.lower()}"
            graph.node.append(helper.make_node(f"Reduce{red}", [t], [out], name=out, keepdims=0))
            graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
    lo = np.full(len(tensors), np.inf, np.float32)
    hi = np.full(len(tensors), -np.inf, np.float32)
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # the weights stay memory-mapped file pages: packed copies of them would double the session's
    # memory (20 GB of anonymous memory for a float32 SDXL UNet, 0.1 GB without; same run time)
    so.add_session_config_entry("session.disable_prepacking", "1")
    # the augmented graph is passed as bytes; its weights are read from the original files
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent.resolve()))
    blob = model.SerializeToString()
    del model, graph
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    for feed in calibration:
        outs = sess.run(None, feed)
        lo = np.minimum(lo, np.asarray(outs[0::2], np.float32))
        hi = np.maximum(hi, np.asarray(outs[1::2], np.float32))
    del sess
    return {t: (float(a), float(b)) for t, a, b in zip(tensors, lo, hi)}
