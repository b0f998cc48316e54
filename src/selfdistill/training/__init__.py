"""The training wing: every task that updates weights other than the pretraining methods
(fine-tuning, the linear probe) and the online kNN hook of pretraining. Evaluation reads frozen
weights; these tasks train, as tasks of the one loop (:mod:`selfdistill.engine`), and score
themselves with :mod:`selfdistill.eval`. Their protocols (``run_eval.py finetune`` / ``linear``)
join the registry of :mod:`selfdistill.eval.protocols`, which imports this package's modules."""
