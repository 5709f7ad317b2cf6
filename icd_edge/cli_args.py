"""argparse helpers shared by the runtime CLI (``icd-edge``) and the export CLI
(``python -m icd_edge.export``), so both report usage errors the same way. Runtime layer: no
torch, no export imports."""

from __future__ import annotations

import argparse

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


class Once(argparse.Action):
    """A single-valued flag given twice is an error, not "last wins"."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_given", set())
        if self.dest in seen:
            raise argparse.ArgumentError(self, "given twice; pass it once")
        seen.add(self.dest)
        setattr(namespace, self.dest, values)
