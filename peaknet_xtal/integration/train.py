"""Training the integrator by maximising the ELBO on unlabelled shoeboxes (no truth is used).

The same code runs on CPU, CUDA or any torch device (``device=``); batches are drawn with a seeded
generator, so a run is reproducible on one machine.  The default ships after a few minutes on two
CPU cores (``examples/train_integrator_default.py``).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from peaknet_xtal.integration.model import build_model, metadata
from peaknet_xtal.integration.shoebox import Shoeboxes
from peaknet_xtal.progress import Progress

log = logging.getLogger(__name__)


def to_tensors(boxes: Shoeboxes, device: Any = "cpu") -> dict[str, Any]:
    """The model's inputs as float32 tensors on ``device``."""
    import torch

    meta = metadata(boxes.one_over_d, boxes.radial, boxes.offset)
    return {"pixels": torch.as_tensor(boxes.pixels, dtype=torch.float32, device=device),
            "mask": torch.as_tensor(boxes.vi_mask(), device=device),
            "read_noise": torch.as_tensor(boxes.read_noise, dtype=torch.float32, device=device),
            "meta": torch.as_tensor(meta, device=device),
            "one_over_d": torch.as_tensor(boxes.one_over_d, dtype=torch.float32, device=device)}


def train(boxes: Shoeboxes, *, config: dict[str, Any] | None = None, steps: int = 2000,
          batch_size: int = 512, lr: float = 3e-3, samples: int = 4, seed: int = 0,
          device: str = "cpu", model: Any = None, show_progress: bool = True) -> tuple[Any, list]:
    """Fit a model (new, or ``model`` continued) to ``boxes``; returns (model, loss history).

    Loss: the negative ELBO per pixel, averaged over the batch (per pixel so the learning rate
    does not depend on the box size).  Adam with a cosine decay; gradient norm clipped at 5.
    """
    import torch

    torch.manual_seed(seed)
    model = model if model is not None else build_model(config)
    model = model.to(device).train()
    data = to_tensors(boxes, device)
    n = len(boxes)
    if n == 0:
        raise ValueError("no shoeboxes to train on")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    history = []
    npix = float(boxes.side ** 2)
    start = time.perf_counter()
    with Progress(steps, "steps", desc="train integrator", enabled=show_progress) as bar:
        for _step in range(steps):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
            out = model(**{k: v[idx] for k, v in data.items()})
            loss = -model.elbo(out, samples=samples).mean() / npix
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            history.append(float(loss.detach()))
            bar.update(1, extra=f"loss {history[-1]:.4f}")
    log.info("trained %d steps on %d shoeboxes in %.0f s", steps, n, time.perf_counter() - start)
    return model.eval(), history


def posterior(model: Any, boxes: Shoeboxes, *, batch_size: int = 4096,
              device: str | None = None) -> dict[str, np.ndarray]:
    """Posterior summaries (numpy, one row per box) in batches, without gradients."""
    import torch

    if device is None:
        device = str(next(model.parameters()).device)
    parts: list[dict[str, np.ndarray]] = []
    with torch.inference_mode():
        for lo in range(0, len(boxes), batch_size):
            data = to_tensors(boxes.select(slice(lo, lo + batch_size)), device)
            summary = model.summary(model(**data))
            parts.append({k: v.detach().cpu().numpy().astype(np.float64)
                          for k, v in summary.items()})
    if not parts:
        return {k: np.zeros(0) for k in ("photons", "photons_sigma", "photons_lik",
                                          "photons_lik_sigma", "background",
                                          "background_sigma", "profile_dfs", "profile_dss",
                                          "profile_sigma_fs", "profile_sigma_ss",
                                          "profile_observed")}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
