"""icd_edge: Invertible Consistency Distillation (iCD) image editing from an exported bundle.

The runtime (this package minus ``icd_edge.export``) needs only numpy, Pillow, tokenizers and a
backend such as onnxruntime; it never imports torch. Start with :class:`icd_edge.Editor`.
"""

__version__ = "0.1.0"

__all__ = ["Editor", "Inversion", "torch_randn", "__version__"]


def __getattr__(name):  # lazy, so `import icd_edge` stays cheap
    if name in ("Editor", "Inversion"):
        from icd_edge.edit import editor

        return getattr(editor, name)
    if name == "torch_randn":
        from icd_edge.rng import torch_randn

        return torch_randn
    raise AttributeError(f"module 'icd_edge' has no attribute {name!r}")
