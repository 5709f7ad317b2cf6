"""auto on the CPU: int8 graphs that run faster on the other backend for this CPU class are routed
there (RoutedBackend); the routed edit equals the one-backend edit."""

from __future__ import annotations

import pytest

from icd_edge import runtimes
from icd_edge.bundle.store import open_bundle
from icd_edge.edit.editor import Editor
from icd_edge.export.parity import psnr_db
from icd_edge.runtimes.mixed import RoutedBackend

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'icd_edge[openvino]')")


class _Int8Vae:
    """A bundle whose VAE graphs claim int8 (what routing reads); everything else is the real bundle's."""

    def __init__(self, bundle, int8=("vae_encoder", "vae_decoder")):
        self._b, self._int8 = bundle, set(int8)

    def __getattr__(self, name):
        return getattr(self._b, name)

    def precision(self, graph, fmt="onnx"):
        return "int8" if graph in self._int8 else self._b.precision(graph, fmt)


def _edit(ed, photo):
    inv = ed.invert(photo, "a photo of a cat", seed=3)
    return ed.edit(inv, "a photo of a dog", blend=("cat", "dog"), amplify={"dog": 2.0}, output_type="np")


def test_auto_routes_int8_graphs_by_cpu_class(int8_bundle, monkeypatch):
    int8 = open_bundle(int8_bundle, verify=False)
    vae8 = _Int8Vae(int8)
    monkeypatch.setattr(runtimes, "onnxruntime_has_gpu", lambda: False)
    monkeypatch.setattr(runtimes, "isa_class", lambda: "avx2")
    chosen = runtimes.select_backend("auto", vae8)
    assert isinstance(chosen, RoutedBackend) and chosen.name == "onnxruntime+openvino"
    assert (
        chosen.backend_for("vae_decoder").name == "openvino" and chosen.backend_for("taesd_decoder").name == "openvino"
    )
    assert chosen.backend_for("vae_encoder").name == "onnxruntime"  # measured a tie: it stays
    assert chosen.backend_for("unet_forward").name == "onnxruntime"
    assert chosen.describe() == "onnxruntime (vae_decoder, taesd_decoder on openvino)"
    assert chosen.memory_policies == ("resident", "sequential")
    # the VAE decoder stored in fp32 (this bundle as it is) stays: only the int8 TAESD decoder moves
    assert runtimes.select_backend("auto", int8).routes == {"taesd_decoder": "openvino"}
    no_int8 = _Int8Vae(int8, int8=())
    no_int8.precision = lambda graph, fmt="onnx": "fp32" if graph.endswith("decoder") else int8.precision(graph, fmt)
    assert runtimes.select_backend("auto", no_int8).name == "onnxruntime"
    # not for the sequential policy (one runtime, the lower peak), nor where a backend is named
    assert runtimes.select_backend("auto", vae8, memory="sequential").name == "onnxruntime"
    assert runtimes.select_backend("onnxruntime", vae8).name == "onnxruntime"
    # classes without an entry run every graph on their one backend
    for isa in ("amx", "avx512-vnni", "arm"):
        monkeypatch.setattr(runtimes, "isa_class", lambda isa=isa: isa)
        assert not isinstance(runtimes.select_backend("auto", vae8), RoutedBackend), isa
    # typed options reach the member they belong to
    from icd_edge.runtimes.openvino import OvOptions
    from icd_edge.runtimes.ort import OrtOptions

    monkeypatch.setattr(runtimes, "isa_class", lambda: "avx2")
    chosen = runtimes.select_backend("auto", vae8, options=(OrtOptions(intra_op_threads=1), OvOptions(threads=1)))
    assert chosen.members["onnxruntime"].options.intra_op_threads == 1
    assert chosen.members["openvino"].options.threads == 1
    # a GPU onnxruntime runs everything
    monkeypatch.setattr(runtimes, "onnxruntime_has_gpu", lambda: True)
    assert runtimes.select_backend("auto", vae8).name == "onnxruntime"


def test_auto_without_the_other_backend_stays_on_one(int8_bundle, monkeypatch):
    from icd_edge.runtimes import openvino as ovb

    vae8 = _Int8Vae(open_bundle(int8_bundle, verify=False))
    monkeypatch.setattr(runtimes, "onnxruntime_has_gpu", lambda: False)
    monkeypatch.setattr(runtimes, "isa_class", lambda: "avx2")
    monkeypatch.setattr(ovb.OpenVinoBackend, "probe", lambda self: runtimes.Availability(False, "not installed"))
    assert runtimes.select_backend("auto", vae8).name == "onnxruntime"


def test_routed_edit_equals_one_backend(tiny_bundle, photo):
    """The tiny fp32 bundle with its VAE on openvino and the UNets on onnxruntime: the same edit as
    onnxruntime alone to float rounding, each graph's session on its route's backend."""
    from icd_edge.runtimes.openvino import OpenVinoBackend, OvSession
    from icd_edge.runtimes.ort import OrtBackend, OrtSession

    b = open_bundle(tiny_bundle, verify=False)
    routed = RoutedBackend(
        OrtBackend(providers=("CPUExecutionProvider",)),
        {"openvino": OpenVinoBackend(cache_dir="")},
        {"vae_encoder": "openvino", "vae_decoder": "openvino"},
    )
    assert routed.probe().ok
    with Editor(b, routed) as ed:
        got = _edit(ed, photo)
        sessions = {g: ed.session(g) for g in ed.loaded_graphs()}
    assert isinstance(sessions["vae_decoder"], OvSession) and isinstance(sessions["vae_encoder"], OvSession)
    assert all(isinstance(s, OrtSession) for g, s in sessions.items() if not g.startswith("vae_"))
    with Editor.open(b, "onnxruntime", providers=("CPUExecutionProvider",)) as ed:
        want = _edit(ed, photo)
    assert psnr_db(want, got, peak=1.0) > 60


def test_routes_must_name_members():
    from icd_edge.runtimes.ort import OrtBackend

    with pytest.raises(ValueError, match="not members"):
        RoutedBackend(OrtBackend(), {}, {"vae_decoder": "openvino"})


def test_errors_name_the_backend_that_ran_the_graph():
    import numpy as np

    from icd_edge.edit.sessions import SessionPool
    from icd_edge.errors import NumericsError

    class Fake:
        memory_policies = ("resident",)
        options = None

        def __init__(self, name):
            self.name = name

        def open_session(self, bundle, graph):
            class S:
                def run(self, feeds):
                    return {"image": np.array([np.nan], np.float32)}

                def close(self):
                    pass

            return S()

    routed = RoutedBackend(Fake("onnxruntime"), {"openvino": Fake("openvino")}, {"vae_decoder": "openvino"})
    pool = SessionPool(None, routed)
    with pytest.raises(NumericsError, match="vae_decoder returned NaN .* on the openvino backend"):
        pool.run("vae_decoder", "vae_decoder")
    with pytest.raises(NumericsError, match="unet_forward returned NaN .* on the onnxruntime backend"):
        pool.run("unet_forward", "forward_0")


def test_auto_cpu_plan_follows_the_tables_and_what_is_installed():
    both = {"onnxruntime": True, "openvino": True}
    for isa, fastest in runtimes.INT8_CPU_BACKEND.items():
        plan = runtimes.auto_cpu_plan(isa, both)
        assert plan["int8_backend"] == plan["int8_fastest"] == fastest, isa
        assert plan["int8_graph_routes"] == runtimes.INT8_CPU_GRAPH_BACKEND.get(isa, {}), isa
    avx2 = runtimes.auto_cpu_plan("avx2", both)
    assert avx2["int8_graph_routes"] == {"vae_decoder": "openvino", "taesd_decoder": "openvino"}
    # without OpenVINO: onnxruntime runs everything, nothing is routed
    alone = runtimes.auto_cpu_plan("avx2", {"onnxruntime": True, "openvino": False})
    assert alone["int8_backend"] == "onnxruntime" and alone["int8_graph_routes"] == {}
    vnni = runtimes.auto_cpu_plan("avx512-vnni", {"onnxruntime": True, "openvino": False})
    assert vnni["int8_fastest"] == "openvino" and vnni["int8_backend"] == "onnxruntime"
