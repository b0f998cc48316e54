#!/usr/bin/env python
"""Thin entry point; the command lives in selfdistill.cli.pretrain (also `selfdistill-pretrain`)."""
import sys

from selfdistill.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
