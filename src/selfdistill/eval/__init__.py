"""Evaluation: every protocol is one registered function (:mod:`selfdistill.eval.protocols`);
``run_eval.py`` builds its sub-commands from that registry."""
