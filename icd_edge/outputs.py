"""What every command writes with an image: its file-name form of a prompt and its metadata."""

from __future__ import annotations


def slug(prompt: str) -> str:
    """A prompt as a file name: letters and digits of any script kept (lower case), every other
    run of characters one '-', at most 48 characters; 'target' if nothing is left."""
    import unicodedata

    out = []
    for ch in unicodedata.normalize("NFC", prompt).lower():
        if ch.isalnum():
            out.append(ch)
        elif out and out[-1] != "-":
            out.append("-")
    return "".join(out)[:48].strip("-") or "target"


def metadata(ed, command: str, **params) -> dict:
    """The parameters an output image records (``icd-edge inspect`` shows them)."""
    from icd_edge import __version__
    from icd_edge.image import METADATA_KEY

    return {
        METADATA_KEY: __version__,
        "command": command,
        "bundle_id": ed.bundle.bundle_id,
        "model": ed.bundle.manifest.model,
        "backend": ed.backend.name,
        **params,
    }
