"""The fast path's modules compiled ahead of time (AOTInductor), loaded without tracing.

``torch.compile`` with the compile cache artifacts (:mod:`icd_edge.fast.compile_cache`) still
re-traces every UNet variant with Dynamo in each new process: about 35 s of a first edit on an
H200. An AOTInductor package is the compiled model itself (a shared library and its kernels), so
loading it is a ``dlopen``; nothing is traced. One package per graph and call signature (shapes,
strides, dtypes and the host-known Prompt-to-Prompt step flags, which the export bakes in like
``torch.compile`` specialises on them), compiled by :meth:`FastEditor.prepare
<icd_edge.fast.editor.FastEditor.prepare>` from the calls one edit session makes.

The packages hold no weights (``package_constants_in_so=False``): every variant of a UNet reads
the loaded module's own parameters (``load_constants(..., user_managed=True)``), so a package is
a few MB and ten variants of the reverse UNet cost one copy of its weights. A call whose
signature has no package runs the ``torch.compile`` fallback (minutes the first time, logged).

Opt-in (``FastOptions(aot=True)``): on the lent H200's image (torch 2.11 + CUDA 13) loading any
AOTInductor package crashed the process, a two-convolution model included, so prepare first loads
one package in a child process (:func:`check_loads`) and refuses with a clear error where that
crashes. On the CPU (Inductor's C++ backend) the same code compiles, loads and edits.

Layout of an entry (next to the compile cache's): ``<key16>/aot.json`` (material and index),
``<key16>/<graph>-<sig12>.pt2`` and, for tensors the export lifted out of the code,
``<graph>-<sig12>.constants.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

INDEX = "aot.json"
SCHEMA = 1


def signature(args: tuple) -> tuple:
    """What a compiled variant is specific to: each tensor's shape, strides, dtype and device
    type, and every other argument's value."""
    return tuple(
        ("T", tuple(a.shape), tuple(a.stride()), str(a.dtype), a.device.type)
        if isinstance(a, torch.Tensor)
        else ("V", a)
        for a in args
    )


def variant_file(graph: str, sig: tuple) -> str:
    return f"{graph}-{hashlib.sha256(repr(sig).encode()).hexdigest()[:12]}"


def _module_tensors(module: torch.nn.Module) -> dict:
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def _load_package(path: Path, device: torch.device):
    from torch._inductor import aoti_load_package

    # single-threaded runners have no per-call event synchronisation, which CUDA-graph capture forbids
    index = device.index if device.type == "cuda" and device.index is not None else -1
    try:
        return aoti_load_package(str(path), run_single_threaded=True, device_index=index)
    except TypeError:  # a torch without device_index
        return aoti_load_package(str(path), run_single_threaded=True)


class AotGraphs:
    """The packages of one cache entry and the modules they stand for.

    ``record=True`` (what prepare uses): calls run the eager modules and remember one example of
    each signature for :meth:`build`; otherwise a call runs its package, or the fallback.
    """

    def __init__(self, folder: Path, material: dict, device: torch.device, record: bool = False):
        self.folder = Path(folder)
        self.material = material
        self.device = device
        self.record = record
        self.models: dict = {}  # (graph, signature) -> loaded package
        self.examples: dict = {}  # (graph, signature) -> (module, args): calls seen while recording
        self.missed: set = set()
        self.loaded = False
        self.load_s = 0.0

    def wrap(self, graph: str, module: torch.nn.Module, fallback):
        return AotCall(self, graph, module, fallback)

    # ------------------------------------------------------------------ loading
    def load(self, modules: dict[str, torch.nn.Module]) -> bool:
        """Load every package of the entry for ``modules`` (graph name -> the module whose
        parameters it reads). False when there is no entry, or it was unusable (then removed,
        with a warning naming it, and the fallback compiles)."""
        try:
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            return self._drop(f"its index is unreadable ({exc})")
        if index.get("schema") != SCHEMA or index.get("material") != self.material:
            return self._drop("its index does not match this GPU, torch and bundle")
        t0 = time.perf_counter()
        models = {}
        for item in index.get("variants", []):
            graph, path = item.get("graph"), self.folder / f"{item.get('file')}.pt2"
            if graph not in modules:
                continue
            try:
                if path.stat().st_size != item.get("bytes"):
                    return self._drop(f"{path.name} is not the size its index records")
                model = _load_package(path, self.device)
                tensors = _module_tensors(modules[graph])
                if item.get("constants"):
                    from safetensors.torch import load_file

                    tensors.update(load_file(self.folder / item["constants"], device=str(self.device)))
                fqns = model.get_constant_fqns()
                missing = [f for f in fqns if f not in tensors]
                if missing:
                    return self._drop(f"{path.name} needs tensors the module does not have ({', '.join(missing[:3])})")
                model.load_constants({f: tensors[f] for f in fqns}, check_full_update=True, user_managed=True)
            except Exception as exc:  # torch raises RuntimeError and its own types for damaged packages
                return self._drop(f"{path.name} did not load ({type(exc).__name__}: {exc})")
            models[(graph, _sig_from_json(item["signature"]))] = model
        self.models = models
        self.loaded = bool(models)
        self.load_s = round(time.perf_counter() - t0, 3)
        logger.info("%d compiled graphs loaded from %s in %.1f s", len(models), self.folder, self.load_s)
        return self.loaded

    def _drop(self, why: str) -> bool:
        logger.warning(
            "removing the compiled-graph entry %s: %s; the first edit compiles instead (minutes), and "
            "`icd-edge prepare --fast BUNDLE` builds the entry again",
            self.folder,
            why,
        )
        shutil.rmtree(self.folder, ignore_errors=True)
        self.models = {}
        return False

    # ------------------------------------------------------------------ building
    def note(self, graph: str, module, sig: tuple, args: tuple) -> None:
        if (graph, sig) in self.examples or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return
        with torch.inference_mode(False):  # export cannot take inference tensors
            self.examples[(graph, sig)] = (module, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))

    def build(self, progress: bool = True) -> Path:
        """Export and compile every recorded call into the entry folder (written atomically)."""
        import sys

        from safetensors.torch import save_file
        from torch._inductor import aoti_compile_and_package
        from tqdm import tqdm

        from icd_edge.cache import write_entry

        if not self.examples:
            raise RuntimeError("nothing was recorded to compile")
        variants = []
        with write_entry(self.folder, "compiled-graph cache entry") as tmp:
            items = list(self.examples.items())
            with tqdm(items, desc="compiling graphs", unit="graph", disable=not progress, file=sys.stderr) as bar:
                for (graph, sig), (module, args) in bar:
                    bar.set_postfix_str(graph)
                    name = variant_file(graph, sig)
                    with torch.inference_mode(False), torch.no_grad():
                        ep = torch.export.export(module, args, strict=False)
                        path = aoti_compile_and_package(
                            ep,
                            package_path=str(tmp / f"{name}.pt2"),
                            inductor_configs={"aot_inductor.package_constants_in_so": False},
                        )
                    if not variants:
                        check_loads(Path(path))  # before minutes go into the others
                    # tensors the export lifted out of the code (not parameters): saved with the package
                    extra = {
                        k: v.detach().contiguous().cpu() for k, v in ep.constants.items() if isinstance(v, torch.Tensor)
                    }
                    if extra:
                        save_file(extra, str(tmp / f"{name}.constants.safetensors"))
                    variants.append(
                        {
                            "graph": graph,
                            "signature": _sig_to_json(sig),
                            "file": name,
                            "bytes": Path(path).stat().st_size,
                            "constants": f"{name}.constants.safetensors" if extra else None,
                        }
                    )
            index = {"schema": SCHEMA, "material": self.material, "variants": variants}
            index["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            (tmp / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        return self.folder


CHECK = """
import sys
from torch._inductor import aoti_load_package
print(len(aoti_load_package(sys.argv[1], run_single_threaded=True).get_constant_fqns()))
"""


def check_loads(path: Path, timeout: float = 600) -> None:
    """Load ``path`` in a child process: where loading AOTInductor packages crashes (on the H200
    image of torch 2.11 + CUDA 13 it segfaults for any model), prepare says so instead of writing
    an entry that would bring down every later process."""
    import signal
    import subprocess
    import sys

    from icd_edge.errors import BackendUnavailable

    try:
        proc = subprocess.run([sys.executable, "-c", CHECK, str(path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(f"loading a compiled graph took over {timeout:.0f} s in a check process") from None
    if proc.returncode:
        how = (
            f"was killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode < 0 and -proc.returncode in signal.valid_signals()
            else f"failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})"
        )
        raise BackendUnavailable(
            f"AOTInductor packages do not load with this torch on this machine (the check process {how}); "
            "prepare with aot=False (the default; `icd-edge prepare --fast` without --aot), which keeps "
            "torch.compile's cache artifacts instead"
        )


class AotCall:
    """One module's call: its package for a prepared signature, else the fallback."""

    def __init__(self, graphs: AotGraphs, graph: str, module, fallback):
        self.graphs, self.graph, self.module, self.fallback = graphs, graph, module, fallback

    def __call__(self, *args):
        sig = signature(args)
        model = self.graphs.models.get((self.graph, sig))
        if model is not None:
            return model(*args)
        if self.graphs.record:
            self.graphs.note(self.graph, self.module, sig, args)
            return self.module(*args)
        if (self.graph, sig) not in self.graphs.missed:
            self.graphs.missed.add((self.graph, sig))
            if self.graphs.loaded:
                logger.warning("%s: no compiled graph for this call (another batch size?): compiling it", self.graph)
        return self.fallback(*args)


def _sig_to_json(sig: tuple) -> list:
    return [list(x[:1]) + [list(v) if isinstance(v, tuple) else v for v in x[1:]] for x in sig]


def _sig_from_json(items: list) -> tuple:
    return tuple(tuple(tuple(v) if isinstance(v, list) else v for v in x) for x in items)
