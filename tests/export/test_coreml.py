"""Core ML export on Linux: every tiny graph converted, compressed, and its package I/O equal to the
manifest. Prediction needs macOS and is not executed here (see test_coreml_backend.py)."""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY_SEED, run_cli

from icd_edge.bundle import spec
from icd_edge.bundle.schema import Graph, IOSpec
from icd_edge.errors import BackendUnavailable, BundleError, ExportError

if importlib.util.find_spec("coremltools") is None:
    pytest.skip("coremltools is not installed (pip install -c constraints.txt -e '.[coreml]')", allow_module_level=True)

import coremltools as ct  # noqa: E402

from icd_edge.export import to_coreml  # noqa: E402


@pytest.fixture(scope="module")
def coreml_bundle(tmp_path_factory) -> Path:
    """The tiny model with ONNX graphs and Core ML packages (about 2-3 min)."""
    out = tmp_path_factory.mktemp("coreml") / "tiny.bundle"
    run_cli(
        "--model",
        "tiny",
        "--out",
        str(out),
        "--targets",
        "onnx,coreml",
        "--parity",
        "none",  # onnxruntime's parity is tested on the other bundles; Core ML predicts on macOS only
        "--no-progress",
        module="icd_edge.export",
        check=True,
    )
    return out


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _spec_io(package: Path) -> tuple[list[dict], list[dict]]:
    return to_coreml.package_io(ct.models.MLModel(str(package), skip_model_load=True))


def _op_counts(package: Path) -> dict[str, int]:
    from collections import Counter

    prog = ct.models.MLModel(str(package), skip_model_load=True).get_spec().mlProgram
    return Counter(
        op.type
        for fn in prog.functions.values()
        for block in fn.block_specializations.values()
        for op in block.operations
    )


def _op_types(package: Path) -> set[str]:
    return set(_op_counts(package))


def test_every_graph_has_a_package_with_its_size(coreml_bundle):
    m = _manifest(coreml_bundle)
    assert set(m["graphs"]) == set(spec.GRAPHS) - {"taesd_decoder"}  # the re-edit graphs are on by default
    for graph, entry in m["graphs"].items():
        art = entry["artifacts"]["coreml"]
        assert art["file"] == f"coreml/{graph}.mlpackage"
        assert (art["precision"], art["compression"], art["format"]) == ("fp16", "none", "mlprogram")
        package = coreml_bundle / art["file"]
        assert package.is_dir() and art["bytes"] == to_coreml.package_bytes(package) > 0
        assert "not run" in art["parity"]
    assert m["export"]["config"]["coreml_compression"] == "none"
    assert m["tools"]["coremltools"] == ct.__version__


def test_package_io_matches_the_manifest(coreml_bundle):
    """Names (in order), shapes and dtypes read from each package's own spec."""
    m = _manifest(coreml_bundle)
    for graph, entry in m["graphs"].items():
        art = entry["artifacts"]["coreml"]
        inputs, outputs = _spec_io(coreml_bundle / art["file"])
        assert (inputs, outputs) == (art["inputs"], art["outputs"]), graph
        for want, got in zip(entry["inputs"], inputs):
            dtype = "int32" if want["dtype"] == "int64" else want["dtype"]
            assert (got["name"], got["shape"], got["dtype"]) == (want["name"], want["shape"], dtype), graph
        assert [(o["name"], o["shape"], o["dtype"]) for o in outputs] == [
            (o["name"], o["shape"], o["dtype"]) for o in entry["outputs"]
        ], graph
        assert len(inputs) == len(entry["inputs"])
    edit = m["graphs"]["unet_reverse_edit"]["artifacts"]["coreml"]
    assert [i["name"] for i in edit["inputs"]][4:] == [
        "token_map",
        "refine_alpha",
        "equalizer",
        "cross_alpha",
        "self_flag",
    ]
    assert edit["outputs"][1] == {"name": "blend_maps", "dtype": "float32", "shape": [2, m["dims"]["Q"], 77]}
    assert m["graphs"]["text_encoder"]["artifacts"]["coreml"]["inputs"][0]["dtype"] == "int32"


def test_packages_are_fp16_ml_programs(coreml_bundle):
    package = coreml_bundle / "coreml" / "unet_forward.mlpackage"
    model = ct.models.MLModel(str(package), skip_model_load=True)
    assert model.get_spec().WhichOneof("Type") == "mlProgram"
    assert model.user_defined_metadata["icd_edge.graph"] == "unet_forward"
    assert "cast" in _op_types(package)  # fp32 inputs are cast to the fp16 compute type


def test_file_table_covers_the_packages(coreml_bundle, tmp_path):
    from icd_edge.bundle.store import open_bundle

    m = _manifest(coreml_bundle)
    on_disk = {p.relative_to(coreml_bundle).as_posix() for p in (coreml_bundle / "coreml").rglob("*") if p.is_file()}
    assert on_disk and on_disk <= set(m["files"])
    copy = tmp_path / "b"
    shutil.copytree(coreml_bundle, copy)
    weights = copy / "coreml" / "vae_decoder.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(weights.read_bytes())
    data[200] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(copy)


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the refusal off macOS; this is macOS")
def test_editor_refuses_coreml_off_macos(coreml_bundle):
    from icd_edge.edit.editor import Editor

    with pytest.raises(BackendUnavailable, match="Core ML runs only on macOS"):
        Editor.open(coreml_bundle, backend="coreml", verify=False)


@pytest.mark.parametrize(
    "compression, op_type",
    [
        ("linear8", "constexpr_affine_dequantize"),
        ("palettize8", "constexpr_lut_to_dense"),
        ("palettize6", "constexpr_lut_to_dense"),
    ],
)
def test_compression_shrinks_a_package_and_keeps_its_io(coreml_bundle, tmp_path, compression, op_type):
    package = coreml_bundle / "coreml" / "text_encoder.mlpackage"
    base = to_coreml.package_bytes(package)
    model = to_coreml.compress(ct.models.MLModel(str(package), skip_model_load=True), compression)
    out = tmp_path / f"{compression}.mlpackage"
    model.save(str(out))
    assert op_type in _op_types(out) and op_type not in _op_types(package)
    assert _spec_io(out) == _spec_io(package)
    size = to_coreml.package_bytes(out)
    # fp16 weights are 2 bytes; int8 and 8-bit indices 1, 6-bit indices 0.75 (plus LUTs, scales, small fp16 tensors)
    assert size < 0.75 * base, (compression, size, base)
    if compression == "palettize6":
        linear = to_coreml.compress(ct.models.MLModel(str(package), skip_model_load=True), "linear8")
        linear.save(str(tmp_path / "l8.mlpackage"))
        assert size < to_coreml.package_bytes(tmp_path / "l8.mlpackage")


@pytest.fixture(scope="module")
def tiny_decoder():
    """The tiny VAE decoder graph module, its dims and a sample latent (built in memory, seconds)."""
    from icd_edge.export.models import build_random
    from icd_edge.graphs.wrappers import build_graphs

    with tempfile.TemporaryDirectory() as work:
        src = build_random("tiny", TINY_SEED, Path(work))
    dims = spec.dims_for(src.image_hw, int(src.text_encoder.config.hidden_size))
    graphs = build_graphs(src.text_encoder, src.vae, src.unet_forward, src.unet_reverse, dims)
    latent = np.random.default_rng(0).standard_normal((1, 4, dims["h"], dims["h"])).astype(np.float32)
    return src, dims, graphs["vae_decoder"], latent


@pytest.mark.parametrize("compression, attention", [("linear8", "standard"), ("none", "sliced-q")])
def test_export_target_records_options(tmp_path, tiny_decoder, compression, attention):
    """The target itself on one tiny graph (no CLI, seconds): options reach the package and the manifest."""
    from icd_edge.export.pipeline import ExportConfig, ExportContext

    src, dims, module, latent = tiny_decoder
    inputs, outputs = spec.GRAPHS["vae_decoder"]
    graph = Graph("vae_decoder", tuple(s.concrete(dims) for s in inputs), tuple(s.concrete(dims) for s in outputs))
    manifest = SimpleNamespace(graphs={"vae_decoder": graph}, family="sd15")  # the part of a Manifest it uses
    cfg = ExportConfig(
        out=tmp_path / "b",
        model="tiny",
        targets=("onnx", "coreml"),
        coreml_compression=compression,
        coreml_attention=attention,
    )
    ctx = ExportContext(
        cfg, tmp_path, src, {"vae_decoder": module}, {"vae_decoder": {"latent": latent}}, dims, manifest, {}, None
    )
    to_coreml.export_target(ctx)
    coreml = manifest.graphs["vae_decoder"].artifacts["coreml"]
    art = {**coreml.details, "file": coreml.file, "precision": coreml.precision}
    package = tmp_path / art["file"]
    assert (art["compression"], art["attention"]) == (compression, attention)
    assert art["bytes"] == to_coreml.package_bytes(package) and ctx.timings["coreml_vae_decoder_s"] > 0
    ops = _op_counts(package)
    if compression == "linear8":
        assert art["minimum_deployment_target"] == "macOS14" and ops["constexpr_affine_dequantize"] > 0
    if attention == "sliced-q":
        # the decoder's one attention layer (h² queries) is computed in chunks of the query axis
        assert art["minimum_deployment_target"] == "macOS15"
        assert ops["softmax"] == to_coreml.SLICED_Q_CHUNKS and ops["scaled_dot_product_attention"] == 0, ops
    else:
        assert ops["softmax"] == 1, ops


def test_check_io_names_the_difference():
    entry = Graph(
        "text_encoder", (IOSpec("input_ids", "int64", (1, 77)),), (IOSpec("last_hidden_state", "float32", (1, 77, 32)),)
    )
    good_in = [{"name": "input_ids", "dtype": "int32", "shape": [1, 77]}]
    good_out = [{"name": "last_hidden_state", "dtype": "float32", "shape": [1, 77, 32]}]
    to_coreml.check_io("text_encoder", entry, good_in, good_out)
    with pytest.raises(ExportError, match=r"outputs \['var_179'\]"):
        to_coreml.check_io("text_encoder", entry, good_in, [{**good_out[0], "name": "var_179"}])
    with pytest.raises(ExportError, match=r"is float16\(1, 77, 32\), expected float32"):
        to_coreml.check_io("text_encoder", entry, good_in, [{**good_out[0], "dtype": "float16"}])
    with pytest.raises(ExportError, match=r"expected int32\(1, 77\)"):
        to_coreml.check_io("text_encoder", entry, [{**good_in[0], "shape": [1, 76]}], good_out)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--targets", "onnx,coreml", "--coreml-compression", "palettize4"], "must be one of none, linear8"),
        (["--coreml-compression", "linear8"], "add coreml to --targets"),
        (["--targets", "onnx,coreml", "--coreml-attention", "split-einsum"], "must be one of standard, sliced-q"),
    ],
)
def test_export_rejects_bad_coreml_options(tmp_path, args, expect):
    proc = run_cli("--model", "tiny", "--out", str(tmp_path / "b"), *args, module="icd_edge.export")
    assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(platform.system() == "Darwin", reason="relies on compiling being refused off macOS")
def test_compile_cache_hit_and_failed_compile(coreml_bundle, tmp_path):
    """A published ``<key>.mlmodelc`` is used as is; a failed compile leaves nothing in the cache."""
    from icd_edge.runtimes.coreml import compile_cached

    package = coreml_bundle / "coreml" / "text_encoder.mlpackage"
    with pytest.raises(BackendUnavailable, match="could not compile"):  # coremltools refuses to compile off macOS
        compile_cached(package, "k" * 64, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    hit = tmp_path / "cache" / ("k" * 64 + ".mlmodelc")
    hit.mkdir()
    assert compile_cached(package, "k" * 64, tmp_path / "cache") == hit  # no compile attempted
