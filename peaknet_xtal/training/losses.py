"""Training losses: categorical focal loss and the paper's logit distillation loss.

Every loss takes a ``valid`` (B, H, W) bool mask: masked and padded pixels carry no label, so they
must not contribute to the loss or to its normalisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_ALPHA = (0.25, 0.75)  # background, peak
FOCAL_GAMMA = 2.0


def _valid_mean(per_pixel: torch.Tensor, valid: torch.Tensor | None,
                reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum, for callers that normalise over several processes) over valid pixels."""
    weight = torch.ones_like(per_pixel) if valid is None else valid.to(per_pixel.dtype)
    total = (per_pixel * weight).sum()
    return total if reduction == "sum" else total / weight.sum().clamp_min(1.0)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
               alpha: tuple[float, ...] = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA,
               reduction: str = "mean") -> torch.Tensor:
    """Mean over valid pixels of alpha_y (1 - p_y)^gamma (-log p_y).

    ``logits`` (B, C, H, W), ``target`` (B, H, W) integer class.  alpha 0.25/0.75 and gamma 2
    (the paper's values) handle the ~1e-3 peak-pixel fraction without resampling.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    target = target.long()
    logp_y = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    p_y = logp_y.exp()
    a = torch.as_tensor(alpha, dtype=logp.dtype, device=logp.device)[target]
    return _valid_mean(-a * (1.0 - p_y) ** gamma * logp_y, valid, reduction)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      valid: torch.Tensor | None = None, temperature: float = 2.0,
                      weights: tuple[float, float, float] = (0.4, 0.4, 0.2),
                      reduction: str = "mean",
                      target: torch.Tensor | None = None) -> torch.Tensor:
    """w_mse MSE(logits) + w_kl T^2 KL(teacher_T || student_T) + w_focal focal(target).

    MSE is averaged over valid pixels and classes; KL is summed over classes and averaged over valid
    pixels; T^2 keeps the KL gradient scale independent of the temperature.  The focal term learns
    the ground truth ``target`` (B, H, W) where there is one (labelled frames), so the student is
    not bound to the teacher's mistakes; without one it falls back to the teacher's argmax.
    """
    s, t = student.float(), teacher.float()
    mse = _valid_mean(((s - t) ** 2).mean(dim=1), valid, reduction)
    log_ps = F.log_softmax(s / temperature, dim=1)
    log_pt = F.log_softmax(t / temperature, dim=1)
    kl = _valid_mean((log_pt.exp() * (log_pt - log_ps)).sum(dim=1), valid,
                     reduction) * temperature ** 2
    hard = t.argmax(dim=1) if target is None else target.long()
    focal = focal_loss(s, hard, valid, reduction=reduction)
    w_mse, w_kl, w_focal = weights
    return w_mse * mse + w_kl * kl + w_focal * focal
