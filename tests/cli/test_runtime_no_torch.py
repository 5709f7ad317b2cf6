"""The runtime never imports torch, diffusers or transformers (checked in a fresh process)."""

import subprocess
import sys
import textwrap


def test_edit_runs_without_torch(tiny_bundle, photo_png, tmp_path):
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from icd_edge.cli import main
        rc = main(["edit", "--bundle", {str(tiny_bundle)!r}, "--image", {str(photo_png)!r},
                   "--source", "a photo of a cat", "--target", "a photo of a dog",
                   "--out", {str(tmp_path / "o.png")!r}, "--blend", "cat", "dog", "--backend", "auto"])
        rc |= main(["doctor"])
        heavy = [m for m in ("torch", "diffusers", "transformers", "icd_edge.export") if m in sys.modules]
        print("HEAVY", heavy)
        sys.exit(rc or bool(heavy))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "torch: not available" in proc.stdout  # the probe reports, without importing
    assert (tmp_path / "o.png").is_file()
