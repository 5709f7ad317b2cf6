"""The import contract between the layers. The runtime (``bundle``, ``edit``, ``runtimes`` and the
top-level helpers) never imports the export stage, the shared torch graphs or torch itself, except
the two parts that are torch by design: the torch reference backend and the compiled GPU path
(``fast/``). ``graphs`` never imports the export stage. Checked on the source, function-level
imports included, so a lazy import cannot slip past a test that happens not to reach it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "icd_edge"
TORCH_BY_DESIGN = ("runtimes/torch_ref.py", "fast/")
FORBIDDEN_ROOTS = {"torch", "diffusers", "transformers", "peft", "accelerate", "onnxscript"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _modules(*exclude: str):
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        if not rel.startswith(exclude):
            yield rel, p


def test_runtime_never_imports_export_graphs_or_torch():
    offenders = {}
    for rel, path in _modules("export/", "graphs/", *TORCH_BY_DESIGN):
        bad = sorted(
            n
            for n in _imports(path)
            if n.split(".")[0] in FORBIDDEN_ROOTS or n.startswith(("icd_edge.export", "icd_edge.graphs"))
        )
        if bad:
            offenders[rel] = bad
    assert offenders == {}


def test_torch_parts_never_import_export():
    offenders = {
        rel: sorted(n for n in _imports(p) if n.startswith("icd_edge.export"))
        for rel, p in _modules("export/", "bundle/", "edit/", "runtimes/")
        if rel.startswith(("graphs/", "fast/"))
    }
    ref = sorted(n for n in _imports(ROOT / "runtimes" / "torch_ref.py") if n.startswith("icd_edge.export"))
    assert {k: v for k, v in offenders.items() if v} == {} and ref == []


def test_the_scan_sees_lazy_imports():
    """The named exceptions do import torch and the shared graphs, inside functions too: the scan
    would catch the same in any other module."""
    ref = _imports(ROOT / "runtimes" / "torch_ref.py")
    assert "icd_edge.graphs.wrappers" in ref and "diffusers" in ref


def test_export_config_is_torch_free():
    assert not {n.split(".")[0] for n in _imports(ROOT / "export" / "config.py")} & FORBIDDEN_ROOTS
