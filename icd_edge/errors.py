"""Typed errors. Every message says what was expected and how to fix it.

The CLI prints ``error: <message>`` for any :class:`IcdEdgeError` and exits with code 2.
"""


class IcdEdgeError(Exception):
    """Base class for every error icd_edge raises on bad input or a bad environment."""


class InputError(IcdEdgeError, ValueError):
    """An argument is out of range or malformed (prompt, guidance, tau, replace fractions...).

    ``param`` names the API parameter, so the CLI can say its flag instead."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ImageError(IcdEdgeError):
    """An input image cannot be read or is not a supported picture."""


class BundleError(IcdEdgeError):
    """A bundle is missing, incomplete, tampered with or of an unsupported schema."""


class OutputError(IcdEdgeError):
    """An output cannot be written: missing or read-only folder, no permission, full disk, bad name."""


class EditorClosed(IcdEdgeError):
    """An Editor was used after close(); open a new one."""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so temporary files are removed on the way."""


class BackendUnavailable(IcdEdgeError):
    """The requested backend cannot run here; the message carries the probe's reason."""


class ShapeMismatch(IcdEdgeError, ValueError):
    """A tensor fed to a graph does not match the graph's declared name, dtype or shape."""


class NumericsError(IcdEdgeError):
    """A graph produced NaN or infinity (a precision the model's activations do not survive)."""


class ExportError(IcdEdgeError):
    """The export stage failed (missing weights, no network, unsupported layout...)."""


class ParityError(ExportError):
    """An exported graph disagrees with the torch reference beyond its threshold."""
