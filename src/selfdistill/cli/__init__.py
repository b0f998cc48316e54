"""The command lines: ``run_pretrain.py``, ``run_eval.py``, ``selfdistill-shards``."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(main_process: bool = True) -> None:
    """Our INFO lines on the main process; every library at WARNING (its INFO chatter, such as
    Accelerate's per-file checkpoint lines, stays out; its warnings stay in)."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")
    logging.getLogger("selfdistill").setLevel(logging.INFO if main_process else logging.WARNING)


def dispatch(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; an expected user error becomes one line and exit code 2."""
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """An error's own message, also when a DataLoader worker raised it: PyTorch re-raises it in the
    training process with the worker's whole traceback as the message; its last line is the error."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    return message if sep and name.rsplit(".", 1)[-1] == type(error).__name__ else last


def release(error: BaseException) -> None:
    """Drop what the frames of a caught error still hold: a failed DataLoader's iterator (the error
    and its frames form a cycle) then shuts its workers down now, instead of their being killed at
    exit with a traceback after the one-line error."""
    traceback.clear_frames(error.__traceback__)
