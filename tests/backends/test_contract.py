"""One contract for every registered backend (``icd_edge.runtimes.REGISTRY``), on the shared tiny
bundle: a session per graph runs feeds shaped by the graph's spec and returns exactly the spec's
outputs (names, shapes, dtypes), finite; a feed of the wrong shape, dtype or name set raises
``ShapeMismatch`` (``icd_edge.bundle.spec.check_feeds``, called first by every session's ``run``);
``close()`` lets go of the session's engine; and the outputs equal the torch reference's on the
same feeds. A backend that does not probe OK here, or whose artifact format the tiny bundle does
not hold, is skipped with the probe's own reason.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from icd_edge.bundle.store import open_bundle
from icd_edge.errors import ShapeMismatch
from icd_edge.export.parity import GRAPH_MIN_PSNR_DB, compare
from icd_edge.runtimes import REGISTRY, backend_class
from icd_edge.tokenizer import ClipTokenizer

# The attribute holding each backend session's engine, which close() must let go of.
HANDLE = {
    "onnxruntime": "_sess",
    "openvino": "_compiled",
    "torch": "module",
    "tensorrt": "_context",
    "coreml": "_model",
}
# The torch backend loads its modules once and shares them among its sessions: a closed session
# drops its reference, the module lives on with the backend.
SHARED_HANDLE = {"torch"}
# fp32 graphs on an fp32 CPU engine agree with torch to float rounding: 127-140 dB measured
# (onnxruntime 1.32, openvino 2026.4, AVX-512 x86), so 100 dB still fails a silent fp16/bf16
# downcast. Other backends (TensorRT's TF32, Core ML's float16 compute units) are held to the
# export's per-graph gate.
MIN_PSNR_DB = {"onnxruntime": 100.0, "openvino": 100.0}
# P2P controls and step values as an edit step feeds them (identity token map, controls on).
_FIXED = {
    "timestep": lambda shape: np.full(shape, 519.0),
    "token_map": lambda shape: np.eye(shape[0]),
    "refine_alpha": np.ones,
    "equalizer": np.ones,
    "cross_alpha": np.ones,
    "self_flag": np.ones,
}


def test_every_registered_backend_is_in_the_contract():
    assert set(HANDLE) == set(REGISTRY)


@pytest.mark.parametrize("name", REGISTRY)
def test_backend_declares_the_protocol(name, bundle):
    """Importable everywhere (no probe needed): typed options that refuse an unknown field,
    the memory policies it serves, and auto's question answered without building it."""
    import dataclasses

    from icd_edge.errors import InputError
    from icd_edge.runtimes import Backend

    cls = backend_class(name)
    assert dataclasses.is_dataclass(cls.Options) and cls.name == name
    assert "resident" in cls.memory_policies and set(cls.memory_policies) <= {"resident", "sequential", "shared-base"}
    why = cls.auto_skip(bundle, "resident")
    assert why is None or isinstance(why, str)
    backend = cls(options=cls.Options())
    assert isinstance(backend, Backend) and backend.options == cls.Options()
    with pytest.raises(InputError, match="its options are"):
        cls(no_such_option=1)


def _available(name: str, bundle):
    backend = backend_class(name)()
    avail = backend.probe()
    if not avail.ok:
        pytest.skip(f"backend {name!r} is not available here: {avail.reason}")
    if backend.fmt not in bundle.formats():
        pytest.skip(
            f"the tiny bundle holds no {backend.fmt!r} artifacts for backend {name!r} "
            f"(it has: {', '.join(sorted(bundle.formats()))})"
        )
    return backend


def _sample_feeds(bundle, graph: str) -> dict[str, np.ndarray]:
    """Feeds of the spec's names, dtypes and shapes, with realistic values: the tokenized prompt,
    the bundle's guidance embeddings (w = 0 for the source row, 19 for the target), fixed P2P
    controls, an image in [-1, 1] and standard-normal latents."""
    rng = np.random.default_rng(7)
    feeds = {}
    for spec in bundle.graphs[graph].inputs:
        name, shape = spec.name, tuple(spec.shape)
        if name == "input_ids":
            tok = ClipTokenizer(bundle.path(bundle.manifest.tokenizer_file))
            value = np.broadcast_to(tok("a photo of a cat").ids, shape)
        elif name == "timestep_cond":
            value = np.stack([bundle.guidance_embedding(w) for w in (0.0, 19.0)[-shape[0] :]])
        elif name in _FIXED:
            value = _FIXED[name](shape)
        elif name == "image":
            value = rng.uniform(-1.0, 1.0, shape)
        else:
            value = rng.standard_normal(shape)
        feeds[name] = np.array(value, dtype=spec.dtype)  # a writable copy
        assert feeds[name].shape == shape, (graph, name)
    return feeds


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return open_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def feeds(bundle):
    return {graph: _sample_feeds(bundle, graph) for graph in bundle.graphs}


@pytest.fixture(scope="module", params=list(REGISTRY))
def opened(request, bundle):
    """(name, backend, {graph: open session}) for one registered backend."""
    backend = _available(request.param, bundle)
    sessions = {graph: backend.open_session(bundle, graph) for graph in bundle.graphs}
    yield request.param, backend, sessions
    for sess in sessions.values():
        sess.close()


@pytest.fixture(scope="module")
def reference(bundle, feeds):
    """The torch backend's outputs (the bundle's torch/ weights) on ``feeds``."""
    backend = _available("torch", bundle)
    out = {}
    for graph in bundle.graphs:
        sess = backend.open_session(bundle, graph)
        out[graph] = sess.run(feeds[graph])
        sess.close()
    return out


def test_outputs_follow_the_graph_spec(opened, bundle, feeds):
    name, _, sessions = opened
    assert set(sessions) == set(bundle.graphs) and len(sessions) >= 6
    for graph, sess in sessions.items():
        assert sess.graph == graph
        out = sess.run(feeds[graph])
        specs = bundle.graphs[graph].outputs
        assert sorted(out) == sorted(s.name for s in specs), (name, graph)
        for s in specs:
            value = out[s.name]
            assert isinstance(value, np.ndarray), (name, graph, s.name)
            assert (str(value.dtype), tuple(value.shape)) == (s.dtype, s.shape), (name, graph, s.name)
            assert np.isfinite(value).all(), (name, graph, s.name)


def test_wrong_feeds_raise_shape_mismatch(opened, bundle, feeds):
    name, _, sessions = opened
    for graph, sess in sessions.items():
        good = feeds[graph]
        for input_name, value in good.items():
            bad_shape = value.shape[:-1] + (value.shape[-1] + 1,)
            with pytest.raises(ShapeMismatch, match=rf"{graph}\.{input_name}: expected"):
                sess.run({**good, input_name: np.zeros(bad_shape, value.dtype)})
            with pytest.raises(ShapeMismatch, match=rf"{graph}\.{input_name}: expected"):
                sess.run({**good, input_name: value.astype(np.float64 if value.dtype != np.float64 else np.float32)})
        first = next(iter(good))
        with pytest.raises(ShapeMismatch, match="do not match"):
            sess.run({k: v for k, v in good.items() if k != first})
        with pytest.raises(ShapeMismatch, match="do not match"):
            sess.run({**good, "not_an_input": good[first]})


@pytest.mark.parametrize("name", REGISTRY)
def test_close_releases_the_engine(name, bundle, feeds):
    backend = _available(name, bundle)
    for graph in bundle.graphs:
        sess = backend.open_session(bundle, graph)
        sess.run(feeds[graph])
        handle = getattr(sess, HANDLE[name])
        assert handle is not None, (name, graph)
        try:
            ref = weakref.ref(handle)
        except TypeError:  # an engine type without weak references: only the attribute is checked
            ref = None
        del handle
        sess.close()
        gc.collect()
        assert getattr(sess, HANDLE[name]) is None, (name, graph)
        if ref is not None and name not in SHARED_HANDLE:
            assert ref() is None, f"{name} {graph}: the engine is still referenced after close()"


def test_outputs_equal_the_torch_reference(opened, bundle, feeds, reference):
    name, backend, sessions = opened
    gate = MIN_PSNR_DB.get(name, GRAPH_MIN_PSNR_DB)
    worst = {}
    for graph, sess in sessions.items():
        assert bundle.artifact(graph, backend.fmt).precision == "fp32", graph  # the tiny bundle is fp32 throughout
        got = sess.run(feeds[graph])
        if name == "torch":  # the reference itself, loaded a second time: the same numbers exactly
            for key, value in reference[graph].items():
                np.testing.assert_array_equal(got[key], value, err_msg=f"{graph}.{key}")
            continue
        worst[graph] = compare(reference[graph], got)["psnr_db"]
    assert all(db >= gate for db in worst.values()), f"{name} vs torch, PSNR dB per graph (gate {gate}): {worst}"
