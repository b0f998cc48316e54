"""``run_pretrain.py`` with one poisoned micro-batch: the first one of optimizer step 1 (0-based)
returns a NaN loss on every rank. Launched by tests to compare how DDP and DeepSpeed skip it."""

import sys

from selfdistill.cli.pretrain import main
from selfdistill.methods.dino import Dino

original = Dino.training_step
poisoned = False


def training_step(self, student, batch, progress):
    global poisoned
    out = original(self, student, batch, progress)
    if progress.step == 1 and not poisoned:
        poisoned = True
        out.loss = out.loss * float("nan")
    return out


Dino.training_step = training_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
