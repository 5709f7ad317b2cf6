"""Parity with the torch reference: the measures, and the export's checks that record one
:class:`~icd_edge.bundle.schema.ParityEntry` per (check, case, backend, precision)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from icd_edge.bundle.schema import ParityEntry
from icd_edge.errors import ParityError

logger = logging.getLogger(__name__)

# Per-graph gates (fp32). An ONNX graph that misses its gate fails the export.
GRAPH_MIN_PSNR_DB = 60.0
# End to end, decoded image in [0, 1], fp32 bundles.
E2E_MIN_PSNR_DB = 45.0


def psnr_db(reference: np.ndarray, test: np.ndarray, peak: float | None = None) -> float:
    """``20·log10(peak / RMSE)``; ``peak`` defaults to max |reference| (1.0 for images in [0, 1]).

    Identical arrays give +inf, reported as 999.0 so the manifest stays valid JSON.
    """
    ref = np.asarray(reference, dtype=np.float64)
    tst = np.asarray(test, dtype=np.float64)
    if ref.shape != tst.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {tst.shape}")
    peak = float(np.abs(ref).max()) if peak is None else peak
    rmse = float(np.sqrt(np.mean((ref - tst) ** 2)))
    if rmse == 0.0:
        return 999.0
    return float(20.0 * np.log10(max(peak, 1e-12) / rmse))


def max_abs_err(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.abs(np.asarray(reference, np.float64) - np.asarray(test, np.float64)).max())


def compare(reference: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict:
    """Per-output PSNR and max-abs error, plus the worst PSNR as ``psnr_db``."""
    out = {}
    for name, ref in reference.items():
        out[name] = {"psnr_db": round(psnr_db(ref, test[name]), 2), "max_abs_err": max_abs_err(ref, test[name])}
    return {"psnr_db": min(v["psnr_db"] for v in out.values()), "outputs": out}


def graph_parity(bundle_dir: Path, graphs: dict, samples: dict, min_psnr: float) -> list[ParityEntry]:
    """Every graph on onnxruntime vs the torch modules on fixed inputs; fp32 graphs are gated."""
    from icd_edge.bundle.store import open_bundle
    from icd_edge.runtimes.ort import OrtBackend
    from icd_edge.runtimes.torch_ref import TorchBackend

    bundle = open_bundle(bundle_dir, verify=False, allow_incomplete=True)
    ort_b, torch_b = OrtBackend(), TorchBackend(graphs)
    entries = []
    for name in graphs:
        ref = torch_b.open_session(bundle, name).run(samples[name])
        sess = ort_b.open_session(bundle, name)
        got = sess.run(samples[name])
        sess.close()
        precision = bundle.precision(name)
        metrics = compare(ref, got)
        gate = min_psnr if precision == "fp32" else None
        entry = ParityEntry(
            "graph",
            name,
            "onnxruntime",
            precision,
            metrics["psnr_db"],
            max(v["max_abs_err"] for v in metrics["outputs"].values()),
            gate,
            details={"outputs": metrics["outputs"]},
        )
        if entry.meets_gate is False:
            raise ParityError(
                f"{name}: ONNX Runtime differs from torch by {entry.psnr_db} dB PSNR "
                f"(gate {min_psnr} dB): {metrics['outputs']}"
            )
        entries.append(entry)
    return entries


def e2e_parity(
    bundle_dir: Path, graphs: dict, min_psnr: float, dims: dict, calibration_cfg=None
) -> tuple[list[ParityEntry], dict]:
    """Invert + P2P edit with local blend, and generate: ONNX Runtime vs torch fp32, decoded images.

    For reduced precisions the edit is also compared on the calibration photos; the gate applies
    to the mean over all edit cases. Where OpenVINO is installed the same cases also run on the
    openvino backend (its default precision rule) and are recorded alike; the gate is ONNX
    Runtime's, OpenVINO's entries say whether they meet it. Returns (entries, case description).
    """
    from icd_edge.bundle.store import open_bundle
    from icd_edge.edit.editor import Editor
    from icd_edge.export.samples import sample_photo
    from icd_edge.runtimes.ort import OrtBackend
    from icd_edge.runtimes.torch_ref import TorchBackend

    bundle = open_bundle(bundle_dir, verify=False, allow_incomplete=True)
    cases = [("synthetic", sample_photo(dims["H"]), "a photo of a cat", "a photo of a dog", ("cat", "dog"))]
    if calibration_cfg is not None:
        from icd_edge.export.quant.calibration import calibration_cases

        for i, (img, src, tgt, blend) in enumerate(
            calibration_cases(calibration_cfg.calibration, dims["H"], calibration_cfg.calibration_count)
        ):
            cases.append((f"calibration_{i}", img, src, tgt, blend))
    from icd_edge.bundle.spec import REEDIT_GRAPHS

    precision = "+".join(sorted({g.artifacts["onnx"].precision for g in bundle.graphs.values()}))
    reedit = all(g in bundle.graphs for g in REEDIT_GRAPHS)
    edit_args = dict(cross_replace=0.4, self_replace=0.6, seed=0)
    # the reference is the batch-2 edit in torch; each runtime editor runs alone and is closed
    # before the next (at full size two sets of resident graphs would not fit)
    ref_editor = Editor(bundle, TorchBackend(graphs), source_cache="off")
    references = {("edit", name): (_parity_edit(ref_editor, *args, **edit_args), args) for name, *args in cases}
    references[("generate", "synthetic")] = (ref_editor.generate("a photo of a dog", seed=1, output_type="np"), None)
    ref_editor.close()
    entries = _run_cases(Editor(bundle, OrtBackend(), source_cache="off"), references, edit_args, precision, min_psnr)
    if reedit:  # the same edits through the source cache (recorded as "reedit")
        entries += _run_cases(
            Editor(bundle, OrtBackend(), source_cache="invert"), references, edit_args, precision, min_psnr, "reedit"
        )
    edits = [e.psnr_db for e in entries if e.check in ("edit", "reedit")]
    edit_mean = round(float(np.mean(edits)), 2)
    generate = next(e.psnr_db for e in entries if e.check == "generate")
    if edit_mean < min_psnr or generate < min_psnr:
        raise ParityError(
            f"end to end, ONNX Runtime ({precision}) vs torch fp32: edit {edit_mean} dB (mean of "
            f"{len(edits)} edits), generate {generate} dB; the gate is {min_psnr} dB (lower it with --min-psnr)"
        )
    ov = _openvino_backend()  # recorded after the gate: a failing export does not wait for it
    if ov is not None:
        entries += _openvino_parity(Editor(bundle, ov, source_cache="off"), references, edit_args, min_psnr)
        if reedit:
            ov_edits = {k: v for k, v in references.items() if k[0] == "edit"}
            entries += _openvino_parity(
                Editor(bundle, ov, source_cache="invert"), ov_edits, edit_args, min_psnr, check="reedit"
            )
    photo = "synthetic (icd_edge.export.samples.sample_photo)" + (" + calibration photos" if calibration_cfg else "")
    if bundle.manifest.family == "sdxl":
        case = {"photo": photo, "edit": "prompt switch", "guidance": 19.0, "tau": 0.7, "seed": 0}
        applies = "the mean of the edit cases, and generate"
    else:
        case = {"photo": photo, "cross_replace": 0.4, "self_replace": 0.6, "amplify": 2.0, "seed": 0}
        applies = "the mean of the edit cases (batch-2 edits and re-edits), and generate"
    info = {"gate_db": min_psnr, "gate_applies_to": applies, "case": case}
    return entries, info


def _run_cases(editor, references, edit_args, precision, gate, edit_check="edit") -> list[ParityEntry]:
    """The reference cases on one runtime editor (then closed); ``edit_check`` names its edits."""
    entries = []
    try:
        for (check, case), (ref, args) in references.items():
            if check == "generate":
                if edit_check != "edit":
                    continue  # generate does not depend on the edit path
                got = editor.generate("a photo of a dog", seed=1, output_type="np")
                entries.append(_image_entry("generate", case, "onnxruntime", precision, ref, got, gate))
            else:
                got = _parity_edit(editor, *args, **edit_args)
                details = {"source": args[1], "target_prompt": args[2]}
                entries.append(_image_entry(edit_check, case, "onnxruntime", precision, ref, got, gate, details))
    finally:
        editor.close()
    return entries


def _image_entry(check, target, backend, precision, ref, got, gate, details=None) -> ParityEntry:
    return ParityEntry(
        check,
        target,
        backend,
        precision,
        round(psnr_db(ref, got, peak=1.0), 2),
        max_abs_err(ref, got),
        gate,
        details=details or {},
    )


def _parity_edit(ed, photo, src, tgt, blend, cross_replace, self_replace, seed):
    inv = ed.invert(photo, src, seed=seed)
    if ed.bundle.manifest.family == "sdxl":  # a prompt switch at the official settings
        return ed.edit(inv, tgt, output_type="np")
    return ed.edit(
        inv,
        tgt,
        cross_replace=cross_replace,
        self_replace=self_replace,
        amplify={tgt.split()[-1]: 2.0},
        blend=blend,
        output_type="np",
    )


def _openvino_parity(
    editor, references: dict, edit_args: dict, min_psnr: float, check: str = "edit"
) -> list[ParityEntry]:
    """The end-to-end cases on the openvino backend (its ``auto`` precision) against the torch
    images in ``references`` ({(check, case): (image, (photo, src, tgt, blend) or None)}).
    Recorded only: the gate is onnxruntime's; a NaN result is recorded, not raised."""
    import openvino

    from icd_edge.errors import NumericsError

    version = openvino.__version__.split("-")[0]
    entries = []
    try:
        for (kind, case), (ref, args) in references.items():
            got = (
                _parity_edit(editor, *args, **edit_args)
                if args is not None
                else editor.generate("a photo of a dog", seed=1, output_type="np")
            )
            label = check if kind == "edit" else kind
            entries.append(_image_entry(label, case, "openvino", "auto", ref, got, min_psnr, {"version": version}))
    except NumericsError as exc:
        logger.warning("OpenVINO (precision auto) failed the end-to-end parity: %s", exc)
        return entries + [
            ParityEntry(
                check, "synthetic", "openvino", "auto", gate_db=min_psnr, error=str(exc), details={"version": version}
            )
        ]
    finally:
        hints = {g: editor.session(g).precision for g in editor.loaded_graphs()}
        editor.close()
    entries = [replace(e, details={**e.details, "inference_precision": dict(sorted(hints.items()))}) for e in entries]
    below = [f"{e.check} {e.target} {e.psnr_db} dB" for e in entries if e.meets_gate is False]
    if below:
        logger.warning(
            "OpenVINO (precision auto) vs torch below the %.1f dB gate (%s); run this bundle with "
            "--ov-precision fp32 or on onnxruntime",
            min_psnr,
            ", ".join(below),
        )
    return entries


def _openvino_backend():
    """The openvino backend for parity when OpenVINO is installed and usable, else None (no cache:
    an export should not fill the user's cache with a bundle's first compile)."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return None
    from icd_edge.runtimes.openvino import OpenVinoBackend

    backend = OpenVinoBackend(cache_dir="")
    return backend if backend.probe().ok else None
