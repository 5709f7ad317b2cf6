"""The device-side fast loop (batched, fused-attention P2P, blend on the device) equals the host
loop of :class:`icd_edge.edit.editor.Editor` on the torch reference (CPU, fp32, no compile/graphs).
The CUDA path (fp16, compile, CUDA graphs) is covered by the GPU-marked test and the benchmark."""

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SEED

from icd_edge.bundle.store import open_bundle
from icd_edge.edit.editor import Editor
from icd_edge.export.parity import psnr_db
from icd_edge.fast.editor import FastEditor, FastOptions
from icd_edge.runtimes.torch_ref import TorchBackend


@pytest.fixture(scope="module")
def setup(tiny_bundle):
    from icd_edge.export.models import build_random
    from icd_edge.graphs.wrappers import build_graphs

    b = open_bundle(tiny_bundle)
    with tempfile.TemporaryDirectory() as work:
        src = build_random("tiny", TINY_SEED, Path(work))
    ref = Editor(
        b,
        TorchBackend(
            build_graphs(
                copy.deepcopy(src.text_encoder),
                copy.deepcopy(src.vae),
                copy.deepcopy(src.unet_forward),
                copy.deepcopy(src.unet_reverse),
                b.dims,
            )
        ),
    )
    fast = FastEditor(
        b,
        src.text_encoder,
        src.vae,
        src.unet_forward,
        src.unet_reverse,
        FastOptions(device="cpu", dtype="float32", channels_last=False, compile=False, cuda_graphs=False),
    )
    return ref, fast


def test_single_edit_matches_host_loop(setup, photo):
    ref, fast = setup
    kw = dict(cross_replace=0.4, self_replace=0.6, amplify={"dog": 2.0}, blend=("cat", "dog"), guidance=19.0, tau=0.8)
    a = ref.edit(ref.invert(photo, "a photo of a cat", seed=4), "a photo of a dog", output_type="np", **kw)
    b = fast.edit_image(photo, "a photo of a cat", "a photo of a dog", seed=4, output_type="np", **kw)
    assert psnr_db(a, b, peak=1.0) > 80
    # the PIL output's pixels are made on the device: array_to_pil's truncation of the same floats
    from icd_edge.image import array_to_pil

    pil = fast.edit_image(photo, "a photo of a cat", "a photo of a dog", seed=4, **kw)
    np.testing.assert_array_equal(np.asarray(pil), np.asarray(array_to_pil(b)))


def test_batch_equals_one_by_one(setup, photo):
    _, fast = setup
    photos = [photo, photo[::-1].copy(), photo[:, ::-1].copy()]
    srcs = ["a photo of a cat", "a cat", "a photo of a cat"]
    tgts = ["a photo of a dog", "a big dog", "a painting of a tiger"]
    lat = fast.invert_batch(photos, srcs, [1, 2, 3])
    batch = fast.edit_batch(lat, srcs, tgts, cross_replace=0.6, self_replace=0.4)
    for i in range(3):
        one = fast.edit_batch(
            fast.invert_batch([photos[i]], [srcs[i]], [i + 1]),
            [srcs[i]],
            [tgts[i]],
            cross_replace=0.6,
            self_replace=0.4,
        )[0]
        assert psnr_db(one, batch[i], peak=1.0) > 80
    assert batch.shape == (3, 128, 128, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("steps", [(4, 4), (3, 4), (4, 3)], ids=["4+4", "3+4", "4+3"])
def test_cuda_fast_path_matches_eager_reference(tmp_path, steps):
    """fp16 + channels_last + compile + CUDA graphs vs the fp32 eager reference (≥ 40 dB), for the
    released schedule and the mixed ones."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    from icd_edge.export.pipeline import memory_bundle
    from icd_edge.export.samples import sample_photo

    src, b = memory_bundle("tiny", TINY_SEED, tmp_path, steps=steps)
    assert [len(b.manifest.schedule.forward), len(b.manifest.schedule.reverse)] == list(steps)
    photo = sample_photo(256)
    torch.backends.cudnn.allow_tf32 = False
    ref = FastEditor(
        b,
        *copy.deepcopy([src.text_encoder, src.vae, src.unet_forward, src.unet_reverse]),
        FastOptions(dtype="float32", channels_last=False, compile=False, cuda_graphs=False),
    )
    kw = dict(cross_replace=0.4, self_replace=0.6, blend=("cat", "dog"))
    a = ref.edit_image(photo, "a photo of a cat", "a photo of a dog", output_type="np", **kw)
    torch.backends.cudnn.allow_tf32 = True
    fast = FastEditor(b, src.text_encoder, src.vae, src.unet_forward, src.unet_reverse, FastOptions())
    for _ in range(3):  # later calls replay the captured graphs
        c = fast.edit_image(photo, "a photo of a cat", "a photo of a dog", output_type="np", **kw)
        assert psnr_db(a, c, peak=1.0) >= 40
    # both loops were captured as CUDA graphs (the edit graph is keyed by its P2P step flags)
    captured = fast.captured_graphs()
    assert ("invert", 1) in captured and any(key[0] != "invert" for key in captured)


@pytest.mark.parametrize(
    "kw",
    [
        dict(cross_replace=0.4, self_replace=0.6, amplify={"dog": 2.0}, blend=("cat", "dog")),
        dict(cross_replace=0.0, self_replace=1.0, mode="refine"),
    ],
    ids=["blend", "self-only"],
)
def test_reedit_batch_equals_edit_batch(setup, photo, kw):
    """N targets of one source cache in one batch = the batch-2 edits of N copies of the inversion;
    the source cache's fields have the host editor's shapes."""
    _, fast = setup
    lat = fast.invert_batch([photo], ["a photo of a cat"], [2])
    source = fast.source_cache(lat, "a photo of a cat")
    k, h = len(fast.c.reverse), fast.h
    assert tuple(source.latents.shape) == (k, 1, 4, h, h) and tuple(source.maps.shape) == (k, 1, fast.q, 77)
    assert source.tensors.shape[:2] == (k, 1) and source.tensors.shape[2] == fast.bundle.dims["S"]
    tgts = ["a photo of a dog", "a photo of a big dog"] if "blend" in kw else ["a photo of a dog", "a photo of a lion"]
    got = fast.reedit_batch(lat, source, "a photo of a cat", tgts, **kw)
    want = fast.edit_batch(lat.expand(2, -1, -1, -1).clone(), ["a photo of a cat"] * 2, tgts, **kw)
    assert got.shape == want.shape == (2, 128, 128, 3)
    for i in range(2):
        assert psnr_db(want[i], got[i], peak=1.0) >= 60
    assert psnr_db(got[0], got[1], peak=1.0) < 60  # the two targets differ


@pytest.mark.gpu
def test_cuda_reedit_matches_eager_batch2_reference(tmp_path):
    """Re-edits on the CUDA path (fp16, compile, CUDA graphs) vs the fp32 eager batch-2 edit (≥ 40 dB)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    from icd_edge.export.pipeline import memory_bundle
    from icd_edge.export.samples import sample_photo

    src, b = memory_bundle("tiny", TINY_SEED, tmp_path, reedit=True)
    photo = sample_photo(256)
    kw = dict(cross_replace=0.4, self_replace=0.6, blend=("cat", "dog"))
    torch.backends.cudnn.allow_tf32 = False
    ref = FastEditor(
        b,
        *copy.deepcopy([src.text_encoder, src.vae, src.unet_forward, src.unet_reverse]),
        FastOptions(dtype="float32", channels_last=False, compile=False, cuda_graphs=False),
    )
    want = ref.edit_image(photo, "a photo of a cat", "a photo of a dog", output_type="np", **kw)
    torch.backends.cudnn.allow_tf32 = True
    fast = FastEditor(b, src.text_encoder, src.vae, src.unet_forward, src.unet_reverse, FastOptions())
    lat = fast.invert_batch([photo], ["a photo of a cat"], [0])
    source = fast.source_cache(lat, "a photo of a cat")
    assert source.tensors.is_cuda and source.tensors.dtype == torch.float16
    for _ in range(3):  # later calls replay the captured graphs
        got = fast.reedit_batch(lat, source, "a photo of a cat", ["a photo of a dog"], **kw)[0]
        assert psnr_db(want, got, peak=1.0) >= 40
    captured = fast.captured_graphs()
    assert ("source", 1) in captured and any(key[0][0] == "reedit" for key in captured if key[0] != "source")


@pytest.mark.gpu
def test_cuda_compile_cache_is_found_by_the_next_process(tiny_bundle, tmp_path):
    """prepare compiles and saves; a new process loads the kernels before compiling (its own
    Inductor folder is empty, so every kernel it finds came from the entry) and edits sooner."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, sys, time; from icd_edge.fast.editor import FastEditor\n"
        "from icd_edge.export.samples import sample_photo\n"
        "t = time.perf_counter()\n"
        "if sys.argv[1] == 'prepare':\n"
        "    print(json.dumps(FastEditor.prepare(sys.argv[2], progress=False)))\n"
        "else:\n"
        "    f = FastEditor.from_bundle(sys.argv[2])\n"
        "    f.edit_image(sample_photo(f.c.image_hw), 'a photo of a cat', 'a photo of a dog', blend=('cat', 'dog'))\n"
        "    print(json.dumps({'loaded': f.compile_cache_loaded, 'seconds': time.perf_counter() - t}))\n"
    )

    def run(mode: str, n: int) -> dict:
        env = {
            **os.environ,
            "ICD_EDGE_CACHE": str(tmp_path / "cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"i{n}"),
        }
        proc = subprocess.run(
            [sys.executable, "-c", script, mode, str(tiny_bundle)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1200,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    built = run("prepare", 1)
    assert built["entry"] and Path(built["entry"], "artifacts.bin").stat().st_size > 0
    again = run("edit", 2)
    assert again["loaded"] and again["seconds"] < built["seconds"]


def test_host_caches_give_the_same_edit_and_refuse_bad_controls(setup, photo):
    """The token and P2P-control caches of the host side: a repeated edit equals the first, a
    change of any control is a new entry, cached arrays are read-only, and a blend word that is not
    in the prompt is still refused (after the inversion was launched) without spoiling later edits."""
    from icd_edge.errors import InputError

    _, fast = setup
    kw = dict(cross_replace=0.4, self_replace=0.6, amplify={"dog": 2.0}, blend=("cat", "dog"))
    first = fast.edit_image(photo, "a photo of a cat", "a photo of a dog", seed=2, output_type="np", **kw)
    again = fast.edit_image(photo, "a photo of a cat", "a photo of a dog", seed=2, output_type="np", **kw)
    np.testing.assert_array_equal(first, again)
    other = fast.edit_image(
        photo, "a photo of a cat", "a photo of a dog", seed=2, output_type="np", **{**kw, "self_replace": 0.0}
    )
    assert not np.array_equal(first, other)
    ctl = fast._controls("a photo of a cat", "a photo of a dog", 4, **kw)
    ctl3 = fast._controls("a photo of a cat", "a photo of a dog", 4, **{**kw, "amplify": {"dog": 3.0}})
    assert ctl3 is not ctl and ctl3.equalizer.max() == 3.0 and ctl.equalizer.max() == 2.0
    assert fast._controls("a photo of a cat", "a photo of a dog", 4, **kw) is ctl
    assert not ctl.token_map.flags.writeable and not fast._ids("a photo of a cat").flags.writeable
    with pytest.raises(InputError, match="horse"):
        fast.edit_image(photo, "a photo of a cat", "a photo of a dog", seed=2, blend=("horse", "dog"))
    with pytest.raises(InputError, match="output_type"):
        fast.edit_image(photo, "a photo of a cat", "a photo of a dog", output_type="tensor")
    after = fast.edit_image(photo, "a photo of a cat", "a photo of a dog", seed=2, output_type="np", **kw)
    np.testing.assert_array_equal(first, after)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_from_bundle_reads_the_weights_straight_in_the_run_dtype(tiny_bundle, dtype):
    """The meta-built modules hold exactly the bundle's tensors (cast once to the run dtype), as
    from_pretrained + .to() gave them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    fast = FastEditor.from_bundle(tiny_bundle, device="cpu", dtype=dtype, compile=False, cuda_graphs=False)
    b, dt = open_bundle(tiny_bundle), getattr(torch, dtype)
    pairs = [
        (CLIPTextModel, "text_encoder", fast.text.text_encoder),
        (AutoencoderKL, "vae_encoder", fast.vae),
        (UNet2DConditionModel, "unet_forward", fast.unet_f.unet),
        (UNet2DConditionModel, "unet_reverse", fast.unet_e.unet),
    ]
    for cls, graph, got in pairs:
        want = cls.from_pretrained(b.path(b.artifact(graph, "torch").dir), use_safetensors=True).state_dict()
        have = got.state_dict()
        assert have.keys() == want.keys(), graph
        for k, v in want.items():
            assert have[k].device.type == "cpu" and not have[k].is_meta
            assert torch.equal(have[k], v.to(dt) if v.is_floating_point() else v), (graph, k)
    assert set(fast.startup) >= {"bundle_s", "weights_s", "build_s"}


def test_from_bundle_refuses_weights_that_do_not_fit(tiny_bundle, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from icd_edge.errors import BundleError
    from icd_edge.fast.weights import load_module

    folder = tmp_path / "unet"
    shutil.copytree(Path(tiny_bundle) / "torch" / "unet_forward", folder)
    f = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    state.pop(next(iter(state)))
    save_file(state, f)
    from diffusers import UNet2DConditionModel

    with pytest.raises(BundleError, match="do not fit its config"):
        load_module(UNet2DConditionModel, folder, "cpu", torch.float32)
    f.unlink()
    with pytest.raises(BundleError, match="holds no safetensors weights"):
        load_module(UNet2DConditionModel, folder, "cpu", torch.float32)
