"""Editing: the public :class:`Editor`, the iCD loops it runs, the session pool and the
Prompt-to-Prompt controls (numpy; the model calls go through a backend's sessions)."""

from icd_edge.edit.editor import Editor, Inversion

__all__ = ["Editor", "Inversion"]
