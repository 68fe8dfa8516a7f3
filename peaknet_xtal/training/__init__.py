"""Training: focal-loss supervision, logit distillation, exact-resume checkpoints, DDP/FSDP."""
from __future__ import annotations
