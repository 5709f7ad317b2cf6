"""The import contract between the layers: the runtime (everything outside ``icd_edge.export``)
never imports the export stage or torch, except the two modules that are torch by design (the
torch reference backend and the compiled GPU path). Checked on the source, function-level imports
included, so a lazy import cannot slip past a test that happens not to reach it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "icd_edge"
TORCH_BY_DESIGN = {"runtimes/torch_ref.py", "runtimes/torch_cuda.py"}
FORBIDDEN_ROOTS = {"torch", "diffusers", "transformers", "peft", "accelerate", "onnxscript"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _runtime_modules():
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        if not rel.startswith("export/"):
            yield rel, p


def test_runtime_never_imports_export_or_torch():
    offenders = {}
    for rel, path in _runtime_modules():
        if rel in TORCH_BY_DESIGN:
            continue
        bad = sorted(n for n in _imports(path) if n.split(".")[0] in FORBIDDEN_ROOTS or n.startswith("icd_edge.export"))
        if bad:
            offenders[rel] = bad
    assert offenders == {}


def test_the_scan_sees_lazy_imports():
    """The named exceptions do import torch and the export's graph wrappers, inside functions too:
    the scan would catch the same in any other module."""
    ref = _imports(ROOT / "runtimes" / "torch_ref.py")
    assert "icd_edge.export.wrappers" in ref and "diffusers" in ref


def test_export_config_is_torch_free():
    assert not {n.split(".")[0] for n in _imports(ROOT / "export" / "config.py")} & FORBIDDEN_ROOTS
