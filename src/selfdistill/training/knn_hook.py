"""The online kNN of pretraining: a hook of the loop that scores the evaluated backbone with the
kNN protocol's set-up (:class:`selfdistill.eval.knn_eval.KnnSetup`). It sits in the training wing,
beside the tasks, because a hook is part of training while the kNN itself only reads weights."""

from __future__ import annotations

from typing import Any

from selfdistill.engine.task import Hook
from selfdistill.eval.knn_eval import KnnSetup

__all__ = ["OnlineKnn"]


class OnlineKnn(Hook):
    """kNN of the evaluated backbone every ``knn.every_epochs`` epochs of pretraining, logged as
    ``knn/top1_k20``... rows of ``log.jsonl`` (and the trackers)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.setup: KnnSetup | None = None

    def on_train_start(self, loop: Any) -> None:
        self.setup = KnnSetup.from_config(self.config, loop.accelerator)

    def on_epoch_end(self, loop: Any) -> None:
        if self.setup is not None and loop.state.epoch % self.config.knn.every_epochs == 0:
            results = self.setup.evaluate(loop.task.eval_backbone())
            # the epochs done, as the training row of the same step counts them (1.0 after the first)
            loop.logger.log_eval("knn", results, loop.state.step, loop.state.step / loop.steps_per_epoch)
