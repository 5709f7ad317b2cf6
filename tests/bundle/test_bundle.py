"""Bundle contract: manifest content, parity figures re-checked, tamper/missing/schema/escape refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from icd_edge.bundle.spec import GRAPHS as ALL_GRAPHS
from icd_edge.bundle.spec import OPTIONAL_GRAPHS, REEDIT_GRAPHS
from icd_edge.bundle.store import SCHEMA_VERSION, open_bundle, read_manifest
from icd_edge.errors import BundleError

# a default export: every graph but the TAESD decoder (the re-edit graphs are on by default)
GRAPHS = {k: v for k, v in ALL_GRAPHS.items() if k not in OPTIONAL_GRAPHS or k in REEDIT_GRAPHS}


def test_manifest_describes_every_graph(tiny_bundle):
    b = open_bundle(tiny_bundle)
    m = b.manifest
    assert m.schema_version == SCHEMA_VERSION and m.model == "tiny"
    assert set(m.graphs) == set(GRAPHS)
    for name, g in m.graphs.items():
        onnx_art = g.artifacts["onnx"]
        assert (tiny_bundle / onnx_art.file).is_file() and onnx_art.precision == "fp32"
        assert [i.name for i in g.inputs] == [s.name for s in GRAPHS[name][0]]
        assert all(isinstance(d, int) for i in g.inputs + g.outputs for d in i.shape)
    # the reverse UNet's weights are stored once and shared by the plain, the edit and the re-edit graphs
    weights = {m.graphs[g].artifacts["onnx"].weights for g in ("unet_reverse", "unet_reverse_edit", *REEDIT_GRAPHS)}
    assert len(weights) == 1
    assert m.dims["S"] > 0 and m.graphs["unet_reverse_target"].inputs[-1].shape == (1, m.dims["S"])
    assert m.schedule.config == "4A"
    assert [[st.t, st.s] for st in m.schedule.reverse] == [[999, 779], [779, 519], [519, 259], [259, 0]]
    np.testing.assert_allclose([m.schedule.reverse[0].c1, m.schedule.reverse[0].c2], [3.079753, -2.094919], atol=2e-6)
    assert set(m.guidance.embeddings) == {"0", "7", "11", "15", "19"}
    assert m.vae_scaling_factor == pytest.approx(0.18215)
    assert m.info["sources"]["lora"]["forward"]["layout"] == "peft"
    assert all(len(f.sha256) == 64 for f in m.files.values())
    # the typed manifest writes back the very JSON it was read from
    assert m.to_json() == json.loads((tiny_bundle / "manifest.json").read_text())
    # no exporter debug metadata (stack traces etc.) in the graph files
    import onnx

    for name in GRAPHS:
        graph = onnx.load(str(tiny_bundle / "onnx" / f"{name}.onnx"), load_external_data=False).graph
        assert not any(n.metadata_props or n.doc_string for n in graph.node), name


def test_recorded_parity_meets_the_gates(tiny_bundle):
    par = read_manifest(tiny_bundle).parity
    graphs = par.find("graph")
    assert {e.target for e in graphs} == set(GRAPHS)
    assert min(e.psnr_db for e in graphs) >= 60.0 and all(e.meets_gate for e in graphs)
    assert par.get("edit", "synthetic").psnr_db >= 45.0
    assert par.get("generate", "synthetic").psnr_db >= 45.0
    assert par.get("edit", "synthetic").gate_db == 45.0
    assert par.get("reedit", "synthetic").psnr_db >= 45.0  # the same edit through the source cache


def test_reads_the_previous_schema_version(tiny_bundle, tmp_path):
    """A schema-1 manifest (parity as nested objects) opens, its parity as the same entries."""
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    current = open_bundle(tiny_bundle, verify=False).manifest.parity
    e2e = {
        ("edit" if e.target == "synthetic" else f"edit_{e.target}") if e.check == "edit" else e.check: {
            "backend": e.backend,
            "precision": e.precision,
            "psnr_db": e.psnr_db,
            "max_abs_err": e.max_abs_err,
        }
        for e in current.find("edit") + current.find("generate")
    }
    m["schema_version"] = 1
    m["parity"] = {
        "reference": current.reference,
        "end_to_end": {**e2e, "gate_db": 45.0},
        "graphs": {
            e.target: {
                "backend": e.backend,
                "precision": e.precision,
                "psnr_db": e.psnr_db,
                "max_abs_err": e.max_abs_err,
            }
            for e in current.find("graph")
        },
    }
    (b / "manifest.json").write_text(json.dumps(m))
    old = open_bundle(b, verify=False).manifest
    assert old.schema_version == 1
    key = lambda e: (e.check, e.target, e.backend, e.precision, e.psnr_db, e.max_abs_err)  # noqa: E731
    assert sorted(map(key, old.parity.entries)) == sorted(
        map(key, current.find("graph") + current.find("edit") + current.find("generate"))
    )
    m["schema_version"] = 0
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="too old; re-export"):
        open_bundle(b, verify=False)


def test_parity_rechecked_now(tiny_bundle, photo):
    """Re-run the edit on ONNX Runtime and on the torch weights stored in the bundle."""
    from icd_edge.edit.editor import Editor
    from icd_edge.export.parity import psnr_db

    images = {}
    for backend in ("onnxruntime", "torch"):
        with Editor.open(tiny_bundle, backend=backend) as ed:
            inv = ed.invert(photo, "a photo of a cat", seed=3)
            images[backend] = ed.edit(
                inv,
                "a photo of a dog",
                cross_replace=0.6,
                self_replace=0.4,
                blend=("cat", "dog"),
                amplify={"dog": 3.0},
                output_type="np",
            )
    assert psnr_db(images["torch"], images["onnxruntime"], peak=1.0) >= 45.0


def test_graph_parity_with_in_memory_reference(tiny_bundle, tiny_graphs):
    """Every ONNX graph vs the torch module rebuilt from the seed (independent of stored weights)."""
    from icd_edge.edit.editor import Editor
    from icd_edge.export.parity import psnr_db
    from icd_edge.runtimes.torch_ref import TorchBackend

    b = open_bundle(tiny_bundle)
    photo = np.full((96, 160, 3), 128, np.uint8)
    photo[20:60, 40:120] = (200, 30, 40)
    out = {}
    for label, ed in (
        ("torch", Editor(b, TorchBackend(tiny_graphs))),
        ("ort", Editor.open(tiny_bundle, "onnxruntime")),
    ):
        inv = ed.invert(photo, "a red box", seed=1)
        out[label] = (ed.reconstruct(inv, output_type="np"), ed.generate("a red box", seed=2, output_type="np"))
    for a, c in zip(out["torch"], out["ort"]):
        assert psnr_db(a, c, peak=1.0) >= 45.0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tampered_file_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path / "b")
    f = b / "onnx" / "unet_forward.weights"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(b)


def test_missing_and_truncated_files_are_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path / "b")
    (b / "onnx" / "vae_decoder.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        open_bundle(b)
    b2 = _copy(tiny_bundle, tmp_path / "b2")
    f = b2 / "onnx" / "text_encoder.onnx"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(BundleError, match="truncated"):
        open_bundle(b2, verify=False)


def _edit_manifest(b: Path, fn) -> None:
    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    (b / "manifest.json").write_text(json.dumps(m))


def test_newer_schema_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path / "b")
    _edit_manifest(b, lambda m: m.__setitem__("schema_version", SCHEMA_VERSION + 1))
    with pytest.raises(BundleError, match="newer than this icd_edge"):
        open_bundle(b)


def test_path_escaping_the_bundle_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path / "b")
    (tmp_path / "evil.onnx").write_bytes(b"x")

    def escape(m):
        m["files"]["../evil.onnx"] = {"bytes": 1, "sha256": "0" * 64}

    _edit_manifest(b, escape)
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(b)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(tmp_path / "bad")


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda m: m["dims"].update(H="512"), "dims.H"),
        (lambda m: m["schedule"].pop("forward"), "schedule.forward"),
        (lambda m: m["graphs"].update(unet_forward=None), "graphs.unet_forward"),
        (lambda m: m["schedule"]["coefficients"]["reverse"].pop(), "schedule.coefficients.reverse"),
        (lambda m: m["guidance"]["embeddings"]["19"].append(0.0), "guidance.embeddings['19']"),
        (lambda m: m["vae"].update(scaling_factor=-1), "vae.scaling_factor"),
        (
            lambda m: m["graphs"]["vae_decoder"]["inputs"][0].update(shape=[1, "4"]),
            "graphs.vae_decoder.inputs[0].shape[1]",
        ),
        (
            lambda m: m["files"]["tokenizer/tokenizer.json"].update(sha256="abc"),
            "files['tokenizer/tokenizer.json'].sha256",
        ),
    ],
)
def test_malformed_manifest_values_name_the_key(tiny_bundle, tmp_path, mutate, key):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    mutate(m)
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as err:
        open_bundle(b, verify=False)
    assert key in str(err.value) and "re-export" in str(err.value)
    proc = run_cli("inspect", str(b))
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr


def test_graph_file_outside_the_file_table_is_refused(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    (b / "onnx" / "extra.onnx").write_bytes((b / "onnx" / "vae_decoder.onnx").read_bytes())
    m = json.loads((b / "manifest.json").read_text())
    m["graphs"]["vae_decoder"]["artifacts"]["onnx"]["file"] = "onnx/extra.onnx"  # present, but unchecked
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not size- and hash-checked"):
        open_bundle(b)


def test_inspect_names_a_malformed_parity_entry(tiny_bundle, tmp_path):
    """Parity entries are part of the schema: a malformed one is a one-line error naming it."""
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["parity"]["entries"][1]["psnr_db"] = "high"
    (b / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("inspect", str(b), "--no-verify")
    assert proc.returncode == 2 and "parity.entries[1].psnr_db" in proc.stderr and "Traceback" not in proc.stderr
    m["parity"]["entries"][1]["psnr_db"] = 50.0
    m["schedule"].pop("config")
    (b / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("inspect", str(b), "--no-verify")
    assert proc.returncode == 2 and "schedule.config" in proc.stderr


def test_reedit_graphs_store_few_weights_of_their_own(tiny_bundle):
    """The re-edit graphs read the reverse UNet's tensors: the source graph adds none, the target
    graph at most its cross-attention key weights (used twice there, so stored untransposed again)."""
    import onnx

    def external(graph):
        model = onnx.load(str(tiny_bundle / "onnx" / f"{graph}.onnx"), load_external_data=False)
        out = {}
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in t.external_data}
                out[(ext["location"], int(ext["offset"]), int(ext["length"]))] = t.name
        return out

    shared = set(external("unet_reverse")) | set(external("unet_reverse_edit"))
    source, target = external("unet_reverse_source"), external("unet_reverse_target")
    assert not set(source) - shared
    own = [name for key, name in target.items() if key not in shared]
    # (at SD1.5 size 16 tensors, 38 MB in fp32; none in the tiny model, where the optimiser folds alike)
    assert all(name.endswith("attn2.to_k.weight") for name in own), own
