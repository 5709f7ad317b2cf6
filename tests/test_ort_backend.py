"""onnxruntime backend: provider choice (incl. CUDA / CoreML, which CI cannot run) and IO binding."""

import numpy as np

from icd_edge.editor import Editor
from icd_edge.runtimes.ort import OrtBackend, OrtSession, choose_providers


def test_provider_choice():
    cpu = ["CPUExecutionProvider"]
    assert choose_providers(cpu, "Linux") == cpu
    assert choose_providers(["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"], "Linux") == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CoreMLExecutionProvider", "CPUExecutionProvider"], "Darwin") == \
        ["CoreMLExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CoreMLExecutionProvider", "CPUExecutionProvider"], "Linux") == cpu


def test_io_binding_equals_plain_run(tiny_bundle, photo):
    """The IO-binding path (used on CUDA) runs here on the CPU provider and gives identical images."""
    images = []
    for binding in (False, True):
        with Editor.open(tiny_bundle, backend="onnxruntime", io_binding=binding) as ed:
            inv = ed.invert(photo, "a photo of a cat", seed=2)
            images.append(ed.edit(inv, "a photo of a dog", blend=("cat", "dog"), output_type="np"))
            sess = ed._sessions["unet_reverse_edit"]
            assert isinstance(sess, OrtSession) and (sess._binding is not None) == binding
    np.testing.assert_array_equal(images[0], images[1])


def test_binding_defaults_on_only_for_cuda(tiny_bundle):
    from icd_edge.manifest import open_bundle

    sess = OrtBackend().open_session(open_bundle(tiny_bundle), "text_encoder")
    assert sess.providers[0] == "CPUExecutionProvider" and sess._binding is None
