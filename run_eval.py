#!/usr/bin/env python
"""Thin entry point; the command lives in selfdistill.cli.evaluate (also `selfdistill-eval`)."""
import sys

from selfdistill.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
