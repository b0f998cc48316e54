"""The command lines: ``run_pretrain.py``, ``run_eval.py``, ``selfdistill-shards``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def dispatch(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; an expected user error becomes one line and exit code 2."""
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
