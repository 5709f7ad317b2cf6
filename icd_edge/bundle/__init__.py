"""The bundle: the folder the export writes and the runtime reads, and the only thing they share.

``schema`` is the typed manifest, ``spec`` the graphs' I/O contract, ``store`` opening, verifying
and writing a bundle on disk.
"""

from icd_edge.bundle.store import Bundle, open_bundle

__all__ = ["Bundle", "open_bundle"]
