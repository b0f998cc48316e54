"""selfdistill: one Accelerate training loop for self-supervised distillation of vision models."""

__version__ = "0.1.0"
