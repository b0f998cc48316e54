"""Unreadable training images, across ranks: the check before training (``--check-data``: every
rank decodes its share of the images) and every rank's count as one, which the loop holds to
``data.max_bad_fraction`` and keeps in each checkpoint (so any rank count can resume it). The data
room counts a rank's own unreadable files (:class:`~selfdistill.data.BadSampleTracker`); this is
what the loop needs from all of them.
"""

from __future__ import annotations

import logging
from typing import Any

from selfdistill.data import BadSampleTracker
from selfdistill.engine.distributed import gather_objects
from selfdistill.engine.logger import progress_bar

__all__ = ["all_ranks", "check_images"]

log = logging.getLogger("selfdistill")


def all_ranks(accelerator: Any, tracker: BadSampleTracker) -> BadSampleTracker:
    """Collective: the trackers of every rank as one (each file once: one rank may meet another's)."""
    return BadSampleTracker.combined(gather_objects(accelerator, tracker.state_dict()))


def check_images(accelerator: Any, images: Any, max_bad_fraction: float, show_progress: bool) -> None:
    """Collective: every rank decodes its share of ``images``; fails before training on too many bad."""
    acc = accelerator
    loader = images.check_loader(acc.process_index, acc.num_processes)
    mine = BadSampleTracker()
    with progress_bar(len(loader.sampler), "checking images", acc.is_main_process and show_progress,
                      unit="img", min_interval=30.0) as bar:
        for batch in loader:
            mine.update(batch["bad"], batch["draws"], batch["bad_draws"])
            bar.update(batch["draws"])
            bar.set_postfix(unreadable=mine.n_bad)
    found = all_ranks(acc, mine)
    if acc.is_main_process:
        log.info("checked %d images: %d unreadable (%.3f%%)%s", found.n_draws, found.n_bad, 100 * found.fraction,
                 "".join(f"\n  {path}" for path in list(found.bad)[: found.max_shown_paths]))
    found.check(max_bad_fraction, whole=True)
