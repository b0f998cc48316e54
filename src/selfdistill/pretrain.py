"""Pretraining: a method from the registry, trained by the one loop with the hooks every pretraining
run has (online kNN when ``knn.val_path`` is set, the per-rank summary, the training curves).

    from selfdistill.pretrain import pretraining
    from selfdistill.recipe import load_config

    summary = pretraining(load_config("configs/demo.yaml"), resume="auto").fit()
"""

from __future__ import annotations

from collections.abc import Sequence

from selfdistill.config import Config
from selfdistill.engine.hooks import RankSummary, TrainingCurves
from selfdistill.engine.task import Hook
from selfdistill.engine.trainer import Trainer
from selfdistill.methods import build_method
from selfdistill.training.knn_hook import OnlineKnn

__all__ = ["pretraining"]


def pretraining(config: Config, resume: str | None = None, hooks: Sequence[Hook] = (),
                check_data: bool = False, resume_elastic: bool = False) -> Trainer:
    """The loop for ``config``'s method; ``fit()`` returns this rank's summary."""
    standard: list[Hook] = [OnlineKnn(config)] if config.knn.val_path else []
    standard += [RankSummary(), TrainingCurves()]
    return Trainer(config, lambda: build_method(config), resume=resume, hooks=[*standard, *hooks],
                   check_data=check_data, resume_elastic=resume_elastic)
