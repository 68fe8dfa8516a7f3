"""The variational integrator: a generative model of a shoebox and its amortised posterior.

Generative model (per spot, in photons; ``j`` runs over the box pixels)::

    I ~ Lomax(kappa, mu(d))                    Wilson-like: mu(d) = exp(a0 - B s^2 / 2), s = 1/d
    b ~ Gamma(alpha_b, alpha_b / mu_b)         background photons per pixel
    h ~ Normal(0, 1)^K                         profile latent
    p = (1 - e) softmax(c + W h) + e t         profile (sums to 1) on the central square of half
                                               side ``profile_radius`` (5): learned basis W,
                                               learned tail shape t and weight e
    x_j + v ~ Poisson(I p_j + b + v)           detector: photons x gain + Gaussian read noise

The profile lives on the central 11x11 pixels; the 2-pixel border of the 15x15 box sees only
background.  That is the usual foreground/background split of integration programs, and it keeps a
smooth tail of the learned profile from claiming border pixels: a tail there made bright spots
read ~3 % (about one sigma) high.  Spots wider than 11 pixels need a larger ``profile_radius``.

The intensity prior is Wilson's exponential with the image's scale unknown: an exponential whose
rate has a Gamma(kappa, kappa) spread over images integrates to a Lomax (Pareto II) law with the
same mean.  Its tail is heavy, so a strong spot on a bright frame is not pulled towards the mean of
the whole data set (a plain exponential prior shrank such spots by several sigma).

The last line is the *shifted-Poisson* approximation of Poisson photons plus Gaussian read noise of
variance ``v`` (photons^2): adding ``v`` to the photon-unit pixel value gives a variable whose mean
and variance both equal ``I p_j + b + v``, exactly those of the true sum, and which is Poisson in
the limit of no read noise.  Values below ``-v`` (read noise pulling a dark pixel negative) are
clipped to zero.  Frames must be pedestal-corrected: a constant offset is not modelled.

Variational family: ``q(log I, log b) = Normal(mu, Sigma)`` (bivariate, so I and b stay correlated
as they are in the posterior: an overestimated background means an underestimated spot), i.e.
log-normal marginals for the photons and the background, and a point estimate of ``h`` (MAP under
its Normal prior).  The encoder (a small CNN over the box plus the spot's metadata) amortises the
profile: a weak spot gets the shape learned from spots of its resolution and direction.  Given the
profile, ``mu`` and ``Sigma`` are set per spot by a few Fisher-scoring steps on the log joint
(``mu`` the mode, ``Sigma`` the inverse Fisher information: the Laplace choice of a Gaussian q),
closed-form 2x2 algebra vectorised over spots.  Why not let the network output ``mu`` directly:
strong spots need ~1 % precision on intensities spanning five decades, which an amortised
regressor misses by more than the posterior width (the amortisation gap), ruining calibration; the
scoring steps close that gap at a few operations per pixel.  (A mean-field Gamma q fitted by
coordinate ascent on the count-allocation augmented model was tried first: it underestimated
sigma(I) two- to three-fold wherever background photons share the spot's pixels, because it
ignores the uncertainty of which photon is background.)

Training maximises the ELBO ``E_q[log p(x | I, b, p) + log p(I) + log p(b)] + H[q] + log p(h)``
with reparameterised samples (``torch.distributions``), back-propagating through the unrolled
scoring steps into the encoder, the profile basis and the prior parameters (empirical Bayes).
All code is device-agnostic.

Two things the plain model above got wrong, measured on held-out simulated frames (the README's
table; given the *true* profile it was calibrated, so both are about the learned profile and the
shape of the posterior, not the scoring):

- **The profile's shape error** (``profile_noise``, tau).  The learned profile is never the spot's
  exact shape, and for a bright spot a few per cent of shape error is many sigmas of photon noise:
  z spread 1.2-1.35 from own I/sigma 2 up, and a larger RMS error than summation for the
  brightest spots.  The fit therefore scores with the pixel covariance a relative shape error tau
  per pixel adds (:meth:`VIIntegrator.profile_noise_terms`), which leans bright spots towards
  their box total and widens their sigma by what the shape costs.  The ELBO cannot set tau (the
  model cannot see what its own family misses), so it is chosen on *selection* seeds by
  calibration (``evaluation.select_profile_noise``, ``examples/train_integrator_default.py``) and
  stored in the weights' config; training itself fits the plain model (tau 0).
- **Posterior moments.**  A weak spot's posterior is far from log-normal; the reported mean and sd
  are the exact posterior moments of the plain model by quadrature (:meth:`VIIntegrator.moments`),
  with the shape error's part brought in from the likelihood-only fits with and without it
  (nothing for faint spots, for which the two agree; the shape-error fit for bright ones).

What a merger gets is different (:meth:`VIIntegrator.likelihood_photons`): the likelihood alone,
without the intensity prior (profile fitting with the learned profile), because a merger puts its
own prior on the merged intensity.  The posterior mean is for a spot read on its own.

Pixels nearer to another spot than to this one (``Shoeboxes.owned``) are left out like pixels off
the panel: a neighbour's photons are neither this spot's nor flat background.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

#: The least spot, in photons, at which the likelihood-only fit weighs a box's pixels
#: (``VIIntegrator.likelihood_photons``): an empty box knows its zero to about one photon.
WEIGHT_PHOTONS = 1.0

#: Everything that rebuilds the network (saved beside the weights as JSON).
DEFAULT_CONFIG: dict[str, Any] = {
    "family": "vi_integrator",
    "side": 15,
    "latent": 8,
    "channels": 16,
    "hidden": 64,
    "cavi_steps": 12,
    "profile_radius": 5,
    "profile_noise": 0.0,
}

N_META = 8

#: Gauss-Hermite nodes and their spread (in Laplace sds) for the posterior moments of I.
QUAD_NODES = 16
QUAD_SCALE = 1.5


def _torch() -> Any:
    import torch

    return torch


def build_model(config: dict[str, Any] | None = None) -> Any:
    """A :class:`VIIntegrator` (torch ``nn.Module``) from a config (defaults filled in)."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    if cfg.get("family") != "vi_integrator":
        raise KeyError(f"not an integrator config (family {cfg.get('family')!r})")
    return _module_class()(cfg)


_CLASS: list[Any] = []


def _module_class() -> Any:
    """The module class, defined on first use so that importing this file does not import torch."""
    if _CLASS:
        return _CLASS[0]
    torch = _torch()
    nn = torch.nn

    class VIIntegrator(nn.Module):  # type: ignore[name-defined]
        """Encoder + profile basis + priors; :meth:`posterior` and :meth:`elbo` are the API."""

        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__()
            self.config = dict(config)
            side, ch = int(config["side"]), int(config["channels"])
            latent, hidden = int(config["latent"]), int(config["hidden"])
            self.side, self.latent = side, latent
            self.cavi_steps = int(config["cavi_steps"])
            half = (side + 1) // 2
            self.conv = nn.Sequential(
                nn.Conv2d(3, ch, 3, padding=1), nn.ReLU(),
                nn.Conv2d(ch, ch, 3, padding=1, stride=2), nn.ReLU())
            # Flattened features keep where things are (the profile needs it); the mean-pooled
            # branch is a permutation-invariant summary of the box (brightness, background).
            self.head = nn.Sequential(
                nn.Linear(ch * half * half + ch + N_META, hidden), nn.ReLU(),
                nn.Linear(hidden, latent))
            yy, xx = np.mgrid[0:side, 0:side] - side // 2
            gauss = -0.5 * (xx ** 2 + yy ** 2) / 1.2 ** 2
            self.profile_bias = nn.Parameter(torch.tensor(gauss.ravel(), dtype=torch.float32))
            self.basis = nn.Parameter(0.05 * torch.randn(latent, side * side))
            wide = -0.5 * (xx ** 2 + yy ** 2) / 3.0 ** 2
            self.tail_logits = nn.Parameter(torch.tensor(wide.ravel(), dtype=torch.float32))
            self.tail_weight = nn.Parameter(torch.tensor(-1.5))
            # Priors (empirical Bayes point estimates), all unconstrained.
            self.prior_log_mean = nn.Parameter(torch.tensor(math.log(50.0)))
            self.prior_wilson_b = nn.Parameter(torch.tensor(10.0))
            self.prior_log_shape = nn.Parameter(torch.tensor(0.0))
            self.bg_log_mean = nn.Parameter(torch.tensor(math.log(0.3)))
            self.bg_log_shape = nn.Parameter(torch.tensor(0.0))
            self.register_buffer("_coords", torch.tensor(
                np.stack([xx.ravel(), yy.ravel()]), dtype=torch.float32), persistent=False)
            border = np.maximum(np.abs(xx), np.abs(yy)) >= side // 2 - 1
            self.register_buffer("_border", torch.tensor(border.ravel()), persistent=False)
            support = np.maximum(np.abs(xx), np.abs(yy)) <= int(config["profile_radius"])
            self.register_buffer("_outside", torch.tensor(~support.ravel()), persistent=False)

        # ---- pieces -----------------------------------------------------------------------

        def counts(self, pixels: Any, mask: Any, read_noise: Any) -> tuple[Any, Any, Any]:
            """(shifted counts y, mask, read-noise variance v) flattened to (n, P)."""
            n = pixels.shape[0]
            m = mask.reshape(n, -1).to(pixels.dtype)
            v = (read_noise.to(pixels.dtype) ** 2).clamp_min(1e-6)[:, None]
            y = (pixels.reshape(n, -1) + v).clamp_min(0.0) * m
            return y, m, v

        def encode(self, y: Any, m: Any, meta: Any) -> Any:
            n = y.shape[0]
            img = torch.stack([2.0 * torch.sqrt(y + 0.375) * m / 10.0, torch.log1p(y), m],
                              dim=1).reshape(n, 3, self.side, self.side)
            feats = self.conv(img)
            pooled = feats.mean(dim=(2, 3))
            return self.head(torch.cat([feats.flatten(1), pooled, meta], dim=1))

        def profile(self, h: Any) -> Any:
            core = torch.softmax((self.profile_bias + h @ self.basis).masked_fill(
                self._outside, -1e4), dim=-1)
            tail = torch.softmax(self.tail_logits.masked_fill(self._outside, -1e4), dim=-1)
            e = torch.sigmoid(self.tail_weight)
            return (1 - e) * core + e * tail

        def priors(self, one_over_d: Any) -> tuple[Any, Any]:
            """((Lomax shape, scale) of I per spot, Gamma prior of the background)."""
            dist = torch.distributions
            shape = torch.exp(self.prior_log_shape).clamp(0.3, 1e2)
            log_mean = self.prior_log_mean - 0.5 * self.prior_wilson_b * one_over_d ** 2
            # Lomax mean = scale / (shape - 1) for shape > 1; shape is kept above 0.3 and the
            # scale carries the resolution fall-off.
            scale = torch.exp(log_mean) * shape
            bshape = torch.exp(self.bg_log_shape).clamp(1e-2, 1e2)
            prior_b = dist.Gamma(bshape, bshape * torch.exp(-self.bg_log_mean),
                                 validate_args=False)
            return (shape.expand_as(scale), scale), prior_b

        @staticmethod
        def lomax_log_prob(x: Any, shape: Any, scale: Any) -> Any:
            return torch.log(shape) - torch.log(scale) - (shape + 1) * torch.log1p(x / scale)

        @staticmethod
        def profile_noise_terms(tau: float, big_i: Any, big_b: Any, lam: Any, r: Any, m: Any,
                                p: Any, shape_var: Any = None) -> tuple[Any, Any]:
            """Score and information of (log I, log b) with the profile's own error.

            The learned profile is not the spot's exact shape: let the true one be
            ``p_j (1 + d_j)`` renormalised, ``d_j`` independent with sd ``tau``
            (``profile_noise``).  To first order that adds to the pixel covariance
            ``tau^2 I^2 (P - p p^T)^2`` (``P = diag p``), a diagonal ``tau^2 I^2 p_j^2`` plus a
            rank-2 part that keeps the box total fixed: a wrong shape moves photons between
            pixels, not in or out of the box.  Scoring with this covariance (generalised least
            squares about the Poisson rates; Woodbury identity, 2x2 algebra per spot) weights a
            bright spot towards its background-subtracted total, whose error does not depend on
            the shape, and a weak one towards the profile, where photon noise dominates; the
            information, and so sigma(I), includes what the shape error costs.  ``tau = 0`` is
            the plain Poisson model.  Returns (score (n, 2), information (n, 2, 2)).
            ``shape_var`` replaces ``tau^2 I^2`` (then ``big_i = big_b = 1`` gives the score and
            information of the linear parameters (I, b), as :meth:`likelihood_photons` uses).
            """
            t2 = (tau * big_i) ** 2 if shape_var is None else shape_var
            p2 = p * p
            d = m / (lam + t2[:, None] * p2)
            dp, dp2 = d * p, d * p2
            s0, s1, s2 = d.sum(1), dp.sum(1), dp2.sum(1)
            s3, s4 = (dp2 * p).sum(1), (dp2 * p2).sum(1)
            r0, r1, r2 = (d * r).sum(1), (dp * r).sum(1), (dp2 * r).sum(1)
            # J = [I p, b 1], U = [p^2, p]; J' D^-1 J, J' D^-1 U, U' D^-1 U, J' D^-1 r, U' D^-1 r
            jj = torch.stack([torch.stack([big_i ** 2 * s2, big_i * big_b * s1], -1),
                              torch.stack([big_i * big_b * s1, big_b ** 2 * s0], -1)], -2)
            ju = torch.stack([torch.stack([big_i * s3, big_i * s2], -1),
                              torch.stack([big_b * s2, big_b * s1], -1)], -2)
            uu = torch.stack([torch.stack([s4, s3], -1), torch.stack([s3, s2], -1)], -2)
            jr = torch.stack([big_i * r1, big_b * r0], -1)
            ur = torch.stack([r2, r1], -1)
            # (M^-1 + U' D^-1 U)^-1 = M (1 + U' D^-1 U M)^-1, M = tau^2 I^2 [[0, -1], [-1, p'p]]
            aa = p2.sum(1)
            zero = torch.zeros_like(aa)
            big_m = t2[:, None, None] * torch.stack([torch.stack([zero, -torch.ones_like(aa)], -1),
                                                     torch.stack([-torch.ones_like(aa), aa], -1)],
                                                    -2)
            k = torch.eye(2, dtype=p.dtype, device=p.device) + uu @ big_m
            kdet = k[:, 0, 0] * k[:, 1, 1] - k[:, 0, 1] * k[:, 1, 0]
            kinv = torch.stack([torch.stack([k[:, 1, 1], -k[:, 0, 1]], -1),
                                torch.stack([-k[:, 1, 0], k[:, 0, 0]], -1)], -2) / kdet[:, None,
                                                                                         None]
            core = big_m @ kinv
            info = jj - ju @ core @ ju.transpose(1, 2)
            score = jr - (ju @ (core @ ur[..., None]))[..., 0]
            return score, info

        def fit(self, y: Any, m: Any, v: Any, p: Any, prior_i: Any, prior_b: Any,
                profile_noise: float | None = None) -> tuple[Any, Any]:
            """Mode ``mu`` (n, 2) of (log I, log b) and covariance ``cov`` (n, 2, 2) of q.

            ``profile_noise`` (tau) defaults to the config's; 0 is the plain Poisson model.
            """
            tau = float(self.config.get("profile_noise", 0.0) if profile_noise is None
                        else profile_noise)
            kap, lam0 = prior_i
            c0, d0 = prior_b.concentration, prior_b.rate
            vv = v[:, 0]
            npix = m.sum(1).clamp_min(1.0)
            border = m * self._border.to(m.dtype)
            bg0 = ((y * border).sum(1) / border.sum(1).clamp_min(1.0) - vv).clamp_min(1e-2)
            u = torch.log(((y * m).sum(1) - npix * (bg0 + vv)).clamp_min(1.0))
            w = torch.log(bg0)
            ym = y * m
            shaped = tau > 0
            for _ in range(self.cavi_steps):
                big_i, big_b = torch.exp(u), torch.exp(w)
                lam = big_i[:, None] * p + big_b[:, None] + v
                t = big_i / (big_i + lam0)
                if shaped:
                    score, info = self.profile_noise_terms(tau, big_i, big_b, lam, ym - m * lam,
                                                           m, p)
                    g_u = score[:, 0] + 1.0 - (kap + 1) * t
                    g_w = score[:, 1] + c0 - d0 * big_b
                    f_uu = info[:, 0, 0] + (kap + 1) * t * (1 - t)
                    f_ww = info[:, 1, 1] + d0 * big_b
                    f_uw = info[:, 0, 1]
                else:
                    ratio = ym / lam - m
                    g_u = big_i * (ratio * p).sum(1) + 1.0 - (kap + 1) * t
                    g_w = big_b * ratio.sum(1) + c0 - d0 * big_b
                    inv = m / lam
                    f_uu = big_i ** 2 * (inv * p * p).sum(1) + (kap + 1) * t * (1 - t)
                    f_ww = big_b ** 2 * inv.sum(1) + d0 * big_b
                    f_uw = big_i * big_b * (inv * p).sum(1)
                det = (f_uu * f_ww - f_uw ** 2).clamp_min(1e-12)
                du = ((f_ww * g_u - f_uw * g_w) / det).clamp(-2.0, 2.0)
                dw = ((f_uu * g_w - f_uw * g_u) / det).clamp(-2.0, 2.0)
                u = (u + du).clamp(-12.0, 16.0)
                w = (w + dw).clamp(-12.0, 10.0)
            # Covariance: the inverse observed information at the mode (the Laplace choice),
            # the inverse Fisher information where the observed one is not positive definite.
            big_i, big_b = torch.exp(u), torch.exp(w)
            lam = big_i[:, None] * p + big_b[:, None] + v
            ratio = ym / lam - m
            t = big_i / (big_i + lam0)
            y2 = ym / lam ** 2
            inv = m / lam
            g_u = big_i * (ratio * p).sum(1) + 1.0 - (kap + 1) * t
            g_w = big_b * ratio.sum(1) + c0 - d0 * big_b
            o_uu = big_i ** 2 * (y2 * p * p).sum(1) + (kap + 1) * t * (1 - t) - (
                g_u - 1.0 + (kap + 1) * t)
            o_ww = big_b ** 2 * y2.sum(1) + d0 * big_b - (g_w - c0 + d0 * big_b)
            o_uw = big_i * big_b * (y2 * p).sum(1)
            f_uu = big_i ** 2 * (inv * p * p).sum(1) + (kap + 1) * t * (1 - t)
            f_ww = big_b ** 2 * inv.sum(1) + d0 * big_b
            f_uw = big_i * big_b * (inv * p).sum(1)
            good = (o_uu > 0) & (o_ww > 0) & (o_uu * o_ww - o_uw ** 2 > 0)
            if shaped:
                # The shape error's share: its information minus the plain Poisson one (zero
                # for spots too weak for the shape to matter, so they keep the Laplace choice).
                _, info = self.profile_noise_terms(tau, big_i, big_b, lam, ym - m * lam, m, p)
                o_uu = o_uu + info[:, 0, 0] + (kap + 1) * t * (1 - t) - f_uu
                o_ww = o_ww + info[:, 1, 1] + d0 * big_b - f_ww
                o_uw = o_uw + info[:, 0, 1] - f_uw
                f_uu = info[:, 0, 0] + (kap + 1) * t * (1 - t)
                f_ww = info[:, 1, 1] + d0 * big_b
                f_uw = info[:, 0, 1]
                good = good & (o_uu > 0) & (o_ww > 0) & (o_uu * o_ww - o_uw ** 2 > 0)
            f_uu = torch.where(good, o_uu, f_uu)
            f_ww = torch.where(good, o_ww, f_ww)
            f_uw = torch.where(good, o_uw, f_uw)
            return torch.stack([u, w], -1), self._inverse(f_uu, f_ww, f_uw)

        @staticmethod
        def _inverse(f_uu: Any, f_ww: Any, f_uw: Any) -> Any:
            det = (f_uu * f_ww - f_uw ** 2).clamp_min(1e-12)
            return torch.stack([torch.stack([f_ww, -f_uw], -1),
                                torch.stack([-f_uw, f_uu], -1)], -2) / det[:, None, None]

        # ---- API --------------------------------------------------------------------------

        def forward(self, pixels: Any, mask: Any, read_noise: Any, meta: Any,
                    one_over_d: Any) -> dict[str, Any]:
            y, m, v = self.counts(pixels, mask, read_noise)
            h = self.encode(y, m, meta)
            p = self.profile(h)
            prior_i, prior_b = self.priors(one_over_d)
            mu, cov = self.fit(y, m, v, p, prior_i, prior_b)
            # the plain Poisson fit beside it, for the moments (the same fit when tau = 0)
            mu_p, cov_p = ((mu, cov) if float(self.config.get("profile_noise", 0.0)) <= 0
                           else self.fit(y, m, v, p, prior_i, prior_b, profile_noise=0.0))
            return {"y": y, "m": m, "v": v, "h": h, "p": p, "prior_i": prior_i,
                    "prior_b": prior_b, "mu": mu, "cov": cov, "mu_p": mu_p, "cov_p": cov_p}

        def q(self, out: dict[str, Any]) -> Any:
            """q(log I, log b) as a torch MultivariateNormal."""
            cov = out["cov"]
            l11 = torch.sqrt(cov[:, 0, 0].clamp_min(1e-12))
            l21 = cov[:, 1, 0] / l11
            l22 = torch.sqrt((cov[:, 1, 1] - l21 ** 2).clamp_min(1e-12))
            zero = torch.zeros_like(l11)
            tril = torch.stack([torch.stack([l11, zero], -1), torch.stack([l21, l22], -1)], -2)
            return torch.distributions.MultivariateNormal(out["mu"], scale_tril=tril,
                                                          validate_args=False)

        def elbo(self, out: dict[str, Any], samples: int = 4) -> Any:
            """Per-spot ELBO (nats), MC over reparameterised samples of (log I, log b)."""
            dist = torch.distributions
            q = self.q(out)
            uw = q.rsample((samples,))
            big_i, big_b = torch.exp(uw[..., 0]), torch.exp(uw[..., 1])
            rate = big_i[..., None] * out["p"] + big_b[..., None] + out["v"]
            like = dist.Poisson(rate, validate_args=False).log_prob(out["y"])
            expected = (like * out["m"]).sum(-1)
            # log densities of I and b over log I and log b (the Jacobians are the + u, + w)
            shape, scale = out["prior_i"]
            prior = (self.lomax_log_prob(big_i, shape, scale) + uw[..., 0]
                     + out["prior_b"].log_prob(big_b) + uw[..., 1])
            h = out["h"]
            log_prior_h = dist.Normal(torch.zeros_like(h), torch.ones_like(h),
                                      validate_args=False).log_prob(h).sum(-1)
            return (expected + prior).mean(0) + q.entropy() + log_prior_h

        def moments(self, out: dict[str, Any]) -> tuple[Any, Any]:
            """Posterior mean and sd of the photons: exact moments, not the log-normal's.

            A weak spot's posterior (heavy-tailed prior times a likelihood that allows zero) is
            far from log-normal, and the log-normal q's mean and sd overstate both (a z spread
            of 0.65 where 1 is right, spots of I/sigma below 1).  So the moments of the plain
            Poisson posterior are taken by Gauss-Hermite quadrature along its ridge in
            (log I, log b) (``QUAD_NODES`` nodes placed by its Laplace approximation, importance
            weights from the exact log joint), and the shape error's part (``profile_noise``)
            is brought in from the likelihood-only fits with and without it (see below): none
            for spots too faint for the shape to matter, the shape-error fit itself for bright
            spots, whose posterior is the likelihood.
            """
            mu_p, cov_p = out["mu_p"], out["cov_p"]
            nodes_np, weights_np = np.polynomial.hermite_e.hermegauss(QUAD_NODES)
            nodes = torch.tensor(nodes_np, dtype=mu_p.dtype, device=mu_p.device)
            log_weights = torch.log(torch.tensor(weights_np, dtype=mu_p.dtype,
                                                 device=mu_p.device))
            var_p = cov_p[:, 0, 0].clamp_min(1e-12)
            spread = QUAD_SCALE * torch.sqrt(var_p)
            u = mu_p[:, 0, None] + spread[:, None] * nodes
            w = mu_p[:, 1, None] + (cov_p[:, 1, 0] / var_p)[:, None] * (u - mu_p[:, 0, None])
            big_i, big_b = torch.exp(u), torch.exp(w)
            rate = big_i[..., None] * out["p"][:, None] + big_b[..., None] + out["v"][:, None]
            like = ((out["y"][:, None] * torch.log(rate) - rate) * out["m"][:, None]).sum(-1)
            shape, scale = out["prior_i"]
            prior_b = out["prior_b"]
            log_b = (prior_b.concentration * torch.log(prior_b.rate)
                     - torch.lgamma(prior_b.concentration)
                     + prior_b.concentration * w - prior_b.rate * big_b)
            # target / proposal: the proposal is Normal(mu_p, spread) along u, whose density at
            # each node is exp(-node^2 / 2) up to constants that cancel.
            log_t = (like + self.lomax_log_prob(big_i, shape[:, None], scale[:, None]) + u
                     + log_b + 0.5 * nodes ** 2 + log_weights)
            weights = torch.softmax(log_t, dim=-1)
            mean_q = (weights * big_i).sum(-1)
            var_q = (weights * (big_i - mean_q[:, None]) ** 2).sum(-1)

            tau = float(self.config.get("profile_noise", 0.0))
            if tau <= 0:
                # a weighted mean of positive nodes: positive wherever the pixels are finite
                return _no_estimate_as_nan(mean_q, torch.sqrt(var_q))
            # The shape error's part, from the likelihood alone in photons (linear, where it is
            # a variance tau^2 I^2 (...) that vanishes for faint spots): the weighted fits with
            # and without it, (I_t, L_t) and (I_0, L_0), replace one by the other in the
            # posterior by Gaussian bookkeeping of precisions: 1/var = 1/var_q - 1/L_0 + 1/L_t,
            # mean = var (mean_q/var_q - I_0/L_0 + I_t/L_t).  A bright spot (likelihood-
            # dominated) gets the shape-error fit itself; a faint one, for which the two fits
            # agree, keeps the quadrature's exact moments.  (Shifting the mean by the two
            # Laplace fits' modes, or widening log I by their difference, was tried: for faint
            # spots those differences are not the shape error, and they drove the mean to zero
            # or the sd far above the error: own I/sigma < 1, z RMS 0.7.)  Where the prior has
            # no resolvable share (bright spots, the panel's edge) the swap is additive
            # (:func:`shape_error_moments`).
            i_t, sd_t = self.likelihood_photons(out, mean_q, tau=tau)
            i_0, sd_0 = self.likelihood_photons(out, mean_q, tau=0.0)
            out["likelihood"] = (i_t, sd_t)  # what summary() reports for mergers
            return shape_error_moments(mean_q, var_q, i_0, sd_0 ** 2, i_t, sd_t ** 2)

        def likelihood_photons(self, out: dict[str, Any], start: Any, iterations: int = 3,
                               tau: float | None = None) -> tuple[Any, Any]:
            """Photons from the likelihood alone: the profile fit a merger should be given.

            The posterior mean is shrunk towards the intensity prior (the Lomax of this model),
            right for a spot read on its own, wrong for a merger that puts its own prior on the
            merged intensity (careless' Wilson prior; every observation of a reflection would
            carry the integrator's prior once more, pulling weak reflections towards the mean
            of the data set).  What a merger needs is the likelihood: this is its Gaussian
            summary, the weighted least-squares fit of ``I`` and ``b`` (both free, ``I`` may be
            negative as a background-subtracted measurement may) to the box with the learned
            profile and the model's pixel covariance (Poisson photons plus read noise plus the
            profile's shape error ``profile_noise``, weights at the current estimate with ``I``
            clipped at :data:`WEIGHT_PHOTONS`: iteratively reweighted), and sigma from its
            Fisher information.  No prior of I or b enters: it is profile fitting with the VI's
            profile.  ``start``: the posterior mean of the photons (the weights' first guess);
            ``tau`` defaults to the config's ``profile_noise``.

            Why the weights take at least one photon of spot: on a photon-counting detector's
            near-empty background a box may hold no photon at all; weighted at I = 0 its
            pixels' variance is the (tiny) background alone and the Fisher information claims
            I = 0 to a few hundredths of a photon (a user trial: 542 of 13,210 reflections of a
            simulated run without read noise at sigma 0.005 photons, z RMS 30-38 among the weak
            ones, nearly all the inverse-variance weight of the reflections under 5 photons).
            The Poisson likelihood of an empty box falls by e over one photon of spot, which is
            how well it knows its zero.
            """
            y, m, v, p = out["y"], out["m"], out["v"], out["p"]
            tau = float(self.config.get("profile_noise", 0.0) if tau is None else tau)
            big_i = start
            big_b = torch.exp(out["mu"][:, 1])
            ones = torch.ones_like(big_i)
            info = None
            for _ in range(iterations):
                weight_i = big_i.clamp_min(WEIGHT_PHOTONS)
                lam = weight_i[:, None] * p + big_b.clamp_min(0.0)[:, None] + v
                resid = (y - big_i[:, None] * p - big_b[:, None] - v) * m
                # the shape error scales with the spot itself, not with the floor
                shape_var = (tau * big_i.clamp_min(0.0)) ** 2
                score, info = self.profile_noise_terms(tau, ones, ones, lam, resid, m, p,
                                                       shape_var=shape_var)
                det = (info[:, 0, 0] * info[:, 1, 1] - info[:, 0, 1] ** 2).clamp_min(1e-12)
                big_i = big_i + (info[:, 1, 1] * score[:, 0] - info[:, 0, 1] * score[:, 1]) / det
                big_b = big_b + (info[:, 0, 0] * score[:, 1] - info[:, 0, 1] * score[:, 0]) / det
            assert info is not None
            raw = info[:, 0, 0] * info[:, 1, 1] - info[:, 0, 1] ** 2
            # no information on I (no usable pixel in the box, or none where the profile is):
            # the fit never left its start and its sigma came out 0, a made-up intensity a
            # merger would take as exact; no estimate, NaN (counted and reported by the caller)
            measured = (raw > 1e-12) & (info[:, 0, 0] > 0)
            sigma = torch.sqrt(info[:, 1, 1] / raw.clamp_min(1e-12))
            nan = torch.full_like(big_i, float("nan"))
            return torch.where(measured, big_i, nan), torch.where(measured, sigma, nan)

        def summary(self, out: dict[str, Any]) -> dict[str, Any]:
            """Posterior moments and the profile's centroid/width (box-centre-relative pixels)."""
            mu, cov = out["mu"], out["cov"]
            var_u, var_w = cov[:, 0, 0], cov[:, 1, 1]
            mean_i = torch.exp(mu[:, 0] + 0.5 * var_u)
            mean_b = torch.exp(mu[:, 1] + 0.5 * var_w)
            sd_i = mean_i * torch.sqrt(torch.expm1(var_u))
            if "mu_p" in out:
                mean_i, sd_i = self.moments(out)
            # a box without one usable pixel measures nothing: its moments would be the
            # prior's, a placeholder dressed as a measurement
            unseen = (out["m"].sum(-1) == 0) if "m" in out else None
            if unseen is not None:
                mean_i = torch.where(unseen, torch.full_like(mean_i, float("nan")), mean_i)
                sd_i = torch.where(unseen, torch.full_like(sd_i, float("nan")), sd_i)
            lik = {}
            if "y" in out:  # a full forward pass (the pixels are needed)
                lik_i, lik_sd = (out["likelihood"] if "likelihood" in out
                                 else self.likelihood_photons(out, mean_i))
                lik = {"photons_lik": lik_i, "photons_lik_sigma": lik_sd}
            p = out["p"]
            cx = p @ self._coords[0]
            cy = p @ self._coords[1]
            sx = torch.sqrt((p @ self._coords[0] ** 2 - cx ** 2).clamp_min(0.0))
            sy = torch.sqrt((p @ self._coords[1] ** 2 - cy ** 2).clamp_min(0.0))
            return {"photons": mean_i, "photons_sigma": sd_i, **lik,
                    "background": mean_b,
                    "background_sigma": mean_b * torch.sqrt(torch.expm1(var_w)),
                    "profile_dfs": cx, "profile_dss": cy, "profile_sigma_fs": sx,
                    "profile_sigma_ss": sy, "profile_observed": (p * out["m"]).sum(-1)}

    _CLASS.append(VIIntegrator)
    return VIIntegrator


def shape_error_moments(mean_q: Any, var_q: Any, i_0: Any, l_0: Any, i_t: Any,
                        l_t: Any) -> tuple[Any, Any]:
    """Posterior mean and sd of the photons with the profile's shape error brought in.

    ``(mean_q, var_q)``: the exact moments of the plain Poisson posterior; ``(i_0, l_0)`` and
    ``(i_t, l_t)``: the likelihood-only fits (mean, variance) without and with the shape error.
    The plain likelihood is swapped for the shape-error one by Gaussian bookkeeping of
    precisions, ``1/var = 1/var_q - 1/l_0 + 1/l_t`` and
    ``mean = var (mean_q/var_q - i_0/l_0 + i_t/l_t)``, where the prior's share
    ``1/var_q - 1/l_0`` is resolvably positive (see :meth:`VIIntegrator.moments`).  Where it is
    not (a bright spot: the posterior is the likelihood, and the quadrature's moments and the
    Fisher fit differ by a little non-Gaussianity, either way), that share is noise, and the
    bookkeeping magnifies it by ``l_t / l_0``: for a spot cut by the panel edge the shape error
    makes ``l_t`` some 60 times ``l_0`` (the unseen part of the profile is extrapolated) and the
    precision came out negative.  There the swap is additive, for the mean as for the variance:
    ``mean_q + (i_t - i_0)``, ``var_q + (l_t - l_0)`` (the shape-error fit itself when the
    prior has no share).  The two forms agree in the variance where the share is zero; the one
    with the larger precision is used, so the mean always goes with its own variance.  A mean
    that still comes out non-positive or not finite is no estimate: NaN
    (:func:`_no_estimate_as_nan`).
    """
    torch = _torch()
    gaussian = 1 / var_q - 1 / l_0 + 1 / l_t
    additive = 1 / (var_q + (l_t - l_0))
    use_gaussian = gaussian >= additive
    var = 1 / torch.where(use_gaussian, gaussian, additive)
    mean = torch.where(use_gaussian, var * (mean_q / var_q - i_0 / l_0 + i_t / l_t),
                       mean_q + (i_t - i_0))
    return _no_estimate_as_nan(mean, torch.sqrt(var))


def _no_estimate_as_nan(mean: Any, sd: Any) -> tuple[Any, Any]:
    """NaN for both moments where the mean is not a positive finite number of photons.

    The posterior of a non-negative quantity has a positive mean; anything else says the
    moments failed for that spot (non-finite pixels, a fit that did not converge), and a
    placeholder such as 1e-6 would read like a measurement with its sigma.  The callers count
    and report such spots (``Integrator.integrate_boxes``).
    """
    torch = _torch()
    ok = torch.isfinite(mean) & (mean > 0) & torch.isfinite(sd)
    nan = torch.full_like(mean, float("nan"))
    return torch.where(ok, mean, nan), torch.where(ok, sd, nan)


def metadata(one_over_d: np.ndarray, radial: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(n, N_META) float32 encoder metadata: resolution, radial direction, sub-pixel offset."""
    d = np.asarray(one_over_d, dtype=np.float32)[:, None]
    radial = np.asarray(radial, dtype=np.float32)
    # A spot's elongation axis: (rf^2 - rs^2, 2 rf rs) is the doubled-angle direction.
    axis = np.stack([radial[:, 0] ** 2 - radial[:, 1] ** 2, 2 * radial[:, 0] * radial[:, 1]], 1)
    return np.concatenate([d, d * d, radial, axis, np.asarray(offset, np.float32)],
                          axis=1).astype(np.float32)
