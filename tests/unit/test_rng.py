"""Same seed, same noise as the official code: torch_randn against torch.randn bit for bit, and its
argument checks (pure: no bundle; the Editor's noise, latents and source row are in
tests/edit/test_exactness.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from icd_edge import torch_randn
from icd_edge.errors import InputError

SHAPES = [
    (1,),
    (2,),
    (7,),
    (15,),
    (16,),
    (17,),
    (31,),
    (3, 11),
    (1, 4, 16, 16),
    (1, 4, 64, 64),
    (2, 4, 128, 128),
    (1, 4, 7, 9),
]
SEEDS = [0, 1, 2, 7, 42, 1234, 99999, 2**31 - 1, 2**32 - 1, 2**32 + 5, 2**62 + 11]

_COMPARE = """
import json, sys
import numpy as np, torch
from icd_edge.rng import torch_randn
kernel, shapes, seeds = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
bad = []
for seed in seeds:
    for shape in shapes:
        ref = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
        got = torch_randn(shape, seed, kernel)
        same = got.shape == ref.shape and got.dtype == np.float32
        if not (same and np.array_equal(got.view(np.uint32), ref.view(np.uint32))):
            bad.append([seed, shape, int((got.view(np.uint32) != ref.view(np.uint32)).sum())])
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "bad": bad}))
"""


@pytest.mark.parametrize("capability, kernel", [(None, "auto"), ("avx2", "vectorized"), ("default", "default")])
def test_torch_randn_is_bit_exact(capability, kernel):
    """Against torch itself, with each CPU kernel torch dispatches (ATEN_CPU_CAPABILITY forces
    one): the AVX2/AVX-512 kernel of x86 machines and the generic one of ARM/Apple silicon."""
    import platform

    if capability == "avx2" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("torch's AVX2 kernel exists on x86 only")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    shapes = SHAPES if capability != "default" else SHAPES[:9]  # the generic path calls libm per value: slower
    proc = subprocess.run(
        [sys.executable, "-c", _COMPARE, kernel, json.dumps(shapes), json.dumps(SEEDS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    if capability:
        assert rep["capability"].lower() == capability
    assert rep["bad"] == [], rep


def test_torch_randn_arguments():
    assert torch_randn((), 0).shape == ()
    assert torch_randn(5, 3).shape == (5,)
    np.testing.assert_array_equal(torch_randn((2, 3), 1), torch_randn(6, 1).reshape(2, 3))
    for bad in ({"shape": (-1, 2), "seed": 0}, {"shape": (2,), "seed": -1}, {"shape": (2,), "seed": 1.5}):
        with pytest.raises(InputError):
            torch_randn(**bad)
    with pytest.raises(InputError, match="kernel"):
        torch_randn((16,), 0, kernel="gpu")


def test_consecutive_draws_equal_one_torch_generator():
    """SDXL encodes with a posterior sample and then the start noise from one generator: each
    later draw continues the twister, tails of sizes that are not multiples of 16 included."""
    import torch

    from icd_edge.rng import torch_randn_sequence

    for shapes in (((1, 4, 16, 16), (1, 4, 16, 16)), ((37,), (1, 3, 7, 5), (16,))):
        g = torch.Generator().manual_seed(11)
        want = [torch.randn(sh, generator=g).numpy() for sh in shapes]
        got = torch_randn_sequence(shapes, 11)
        assert all(w.shape == x.shape and np.array_equal(w, x) for w, x in zip(want, got))
    with pytest.raises(InputError, match="16 elements"):
        torch_randn_sequence([(4, 4), (3,)], 0)
