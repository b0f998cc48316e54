"""Whether a person watches the output: progress bars redraw on a terminal and write lines to a
log file. Imports nothing of the package, so the loop's logger and evaluation's passes over
images (which must not import the engine) share one answer."""

from __future__ import annotations

import sys

__all__ = ["interactive"]


def interactive() -> bool:
    """A terminal is watching: a redrawn bar suits it; a file (a SLURM log, ``> log``) gets lines."""
    return sys.stderr.isatty()
