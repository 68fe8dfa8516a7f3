"""The variational model: device-agnostic, a proper ELBO, training that learns, weights I/O."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from peaknet_xtal.errors import FormatError  # noqa: E402
from peaknet_xtal.integration.model import N_META, build_model  # noqa: E402
from peaknet_xtal.integration.shoebox import Shoeboxes  # noqa: E402
from peaknet_xtal.integration.train import posterior, to_tensors, train  # noqa: E402
from peaknet_xtal.integration.weights import load_integrator, save_integrator  # noqa: E402


def _gaussian_boxes(n: int, rng: np.random.Generator, side: int = 15) -> Shoeboxes:
    """Spots drawn from the model's own assumptions: Gaussian profile, flat Poisson background."""
    yy, xx = np.mgrid[0:side, 0:side] - side // 2
    profile = np.exp(-0.5 * (xx ** 2 + yy ** 2) / 1.0 ** 2)
    profile /= profile.sum()
    photons = rng.exponential(200.0, n)
    background = rng.uniform(0.1, 1.0, n)
    lam = photons[:, None, None] * profile + background[:, None, None]
    pixels = rng.poisson(lam).astype(np.float32)
    zeros = np.zeros(n)
    boxes = Shoeboxes(pixels, np.ones(pixels.shape, bool), zeros.astype(np.int32), zeros, zeros,
                      np.full(n, 0.3), np.zeros((n, 2), np.float32), np.ones(n),
                      np.full(n, 0.01, np.float32))
    boxes.extra = {"photons": photons, "background": background}
    return boxes


def test_runs_on_the_meta_device():
    """Shape-only execution on torch's meta device: no tensor is pinned to the CPU (the
    posterior summary included, with the shape error on, as the shipped weights have it)."""
    model = build_model({"profile_noise": 2.5}).to("meta")
    n, side = 3, model.side
    out = model(torch.zeros(n, side, side, device="meta"),
                torch.ones(n, side, side, dtype=torch.bool, device="meta"),
                torch.zeros(n, device="meta"), torch.zeros(n, N_META, device="meta"),
                torch.zeros(n, device="meta"))
    assert out["mu"].device.type == "meta" and out["mu"].shape == (n, 2)
    assert out["cov"].shape == (n, 2, 2) and out["p"].shape == (n, side * side)
    assert model.elbo(out, samples=2).shape == (n,)
    summary = model.summary(out)
    for key in ("photons", "photons_sigma", "photons_lik", "photons_lik_sigma"):
        assert summary[key].device.type == "meta" and summary[key].shape == (n,), key


def test_elbo_is_finite_and_gradients_reach_every_parameter():
    boxes = _gaussian_boxes(64, np.random.default_rng(0))
    model = build_model()
    elbo = model.elbo(model(**to_tensors(boxes)), samples=3)
    assert torch.isfinite(elbo).all()
    (-elbo.mean()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_profile_sums_to_one_and_posterior_is_positive():
    boxes = _gaussian_boxes(32, np.random.default_rng(1))
    model = build_model()
    with torch.inference_mode():
        out = model(**to_tensors(boxes))
    torch.testing.assert_close(out["p"].sum(-1), torch.ones(32))
    post = posterior(model, boxes)
    assert (post["photons"] > 0).all() and (post["photons_sigma"] > 0).all()


def test_training_raises_the_elbo_and_recovers_photons():
    """On data drawn from the model, a short training must improve the held-out ELBO and give
    posterior means that track the truth."""
    rng = np.random.default_rng(2)
    train_boxes, test_boxes = _gaussian_boxes(1500, rng), _gaussian_boxes(400, rng)
    model = build_model()
    with torch.no_grad():
        before = float(model.elbo(model(**to_tensors(test_boxes)), samples=8).mean())
    model, history = train(train_boxes, steps=60, batch_size=256, show_progress=False)
    with torch.no_grad():
        after = float(model.elbo(model(**to_tensors(test_boxes)), samples=8).mean())
    assert after > before
    post = posterior(model, test_boxes)
    assert np.corrcoef(post["photons"], test_boxes.extra["photons"])[0, 1] > 0.99
    assert history[-1] < history[0]


def test_posterior_is_calibrated_when_the_profile_is_right():
    """The Laplace-set q given the true profile: (mean - truth) / sd has unit spread and the
    truth falls inside the 95 % interval of about 95 % of spots (2000 spots: +-0.03)."""
    from peaknet_xtal.integration.evaluation import lognormal_interval

    rng = np.random.default_rng(3)
    boxes = _gaussian_boxes(2000, rng)
    model = build_model()
    side = model.side
    yy, xx = np.mgrid[0:side, 0:side] - side // 2
    profile = np.exp(-0.5 * (xx ** 2 + yy ** 2))
    p = torch.tensor((profile / profile.sum()).ravel(), dtype=torch.float32).expand(2000, -1)
    data = to_tensors(boxes)
    with torch.no_grad():
        # a broad prior (the Lomax scale well above the data) so the likelihood speaks
        model.prior_log_mean.fill_(np.log(200.0))
        model.prior_wilson_b.fill_(0.0)
        y, m, v = model.counts(data["pixels"], data["mask"], data["read_noise"])
        mu, cov = model.fit(y, m, v, p, *model.priors(data["one_over_d"]))
        summary = model.summary({"mu": mu, "cov": cov, "p": p, "m": m})
    mean, sd = summary["photons"].numpy(), summary["photons_sigma"].numpy()
    truth = boxes.extra["photons"]
    bright = truth > 20  # the prior's pull is visible only on the faintest spots
    z = (mean - truth) / sd
    assert 0.9 < np.sqrt(np.mean(z[bright] ** 2)) < 1.1
    lo, hi = lognormal_interval(mean, sd, 1.959964)
    assert abs(np.mean((truth >= lo) & (truth <= hi)) - 0.95) < 0.03


def test_likelihood_estimate_is_unbiased_calibrated_and_free_of_the_prior():
    """Given the true profile, the likelihood-only photons (what mergers get) are unbiased for
    faint spots too, where the posterior mean is pulled by the prior; sigma matches the error
    (z RMS 0.9-1.1, 3000 spots); a weak spot may read negative; and a prior ten times narrower
    moves the posterior mean but not the likelihood estimate."""
    rng = np.random.default_rng(5)
    n = 3000
    boxes = _gaussian_boxes(n, rng)
    boxes.extra["photons"] = photons = rng.exponential(8.0, n)  # mostly faint spots
    side = boxes.side
    yy, xx = np.mgrid[0:side, 0:side] - side // 2
    profile = np.exp(-0.5 * (xx ** 2 + yy ** 2))
    profile /= profile.sum()
    lam = photons[:, None, None] * profile + boxes.extra["background"][:, None, None]
    boxes.pixels = rng.poisson(lam).astype(np.float32)
    model = build_model()
    p = torch.tensor(profile.ravel(), dtype=torch.float32).expand(n, -1)
    data = to_tensors(boxes)
    results = []
    with torch.no_grad():
        for prior_mean in (200.0, 20.0):
            model.prior_log_mean.fill_(np.log(prior_mean))
            model.prior_wilson_b.fill_(0.0)
            y, m, v = model.counts(data["pixels"], data["mask"], data["read_noise"])
            prior_i, prior_b = model.priors(data["one_over_d"])
            mu, cov = model.fit(y, m, v, p, prior_i, prior_b)
            out = {"y": y, "m": m, "v": v, "p": p, "prior_i": prior_i, "prior_b": prior_b,
                   "mu": mu, "cov": cov, "mu_p": mu, "cov_p": cov}
            results.append({k: t.numpy() for k, t in model.summary(out).items()})
    lik, sd = results[0]["photons_lik"], results[0]["photons_lik_sigma"]
    z = (lik - photons) / sd
    assert 0.9 < np.sqrt(np.mean(z ** 2)) < 1.1
    # unbiased in photons (z's own mean is not 0: a low reading has a smaller Poisson sigma)
    rms_sd = np.sqrt(np.mean(sd ** 2))
    assert abs(np.mean(lik - photons)) < 0.05 * rms_sd
    faint = photons < 5
    assert abs(np.mean(lik[faint] - photons[faint])) < 0.1 * np.sqrt(np.mean(sd[faint] ** 2))
    # the posterior mean of the same faint spots is pulled up by the prior
    assert np.mean(results[0]["photons"][faint] - photons[faint]) > 0.5
    assert (lik < 0).any() and (results[0]["photons"] > 0).all()
    # the same to well within sigma (the reweighting starts from the posterior mean)
    assert np.max(np.abs(results[1]["photons_lik"] - lik) / sd) < 0.02
    assert np.abs(results[1]["photons"] - results[0]["photons"])[faint].mean() > 0.3


def test_weights_round_trip_and_bad_files(tmp_path):
    model = build_model({"latent": 4})
    path = save_integrator(model, tmp_path / "integ.safetensors", extra={"note": "x"})
    assert path.with_suffix(".json").exists()
    again = load_integrator(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError, match="bad.safetensors"):
        load_integrator(bad)
    with pytest.raises(FormatError, match="missing.safetensors"):
        load_integrator(tmp_path / "missing.safetensors")


def test_weights_with_infinity_or_another_shape_are_errors_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_integrator(build_model({"latent": 4}), tmp_path / "integ.safetensors")
    state = load_file(str(path))
    meta = {"config": path.with_suffix(".json").read_text()}
    name = next(k for k, v in state.items() if v.is_floating_point())
    broken = dict(state, **{name: torch.full_like(state[name], float("inf"))})
    save_file(broken, str(path), metadata=meta)
    with pytest.raises(FormatError, match=f"integ.safetensors: weights hold NaN or infinite "
                                          f"values \\({name}"):
        load_integrator(path)
    rounded = dict(state, **{name: state[name].to(torch.int32)})
    save_file(rounded, str(path), metadata=meta)
    with pytest.raises(FormatError, match=f"integ.safetensors: weights of another number type "
                                          f"\\({name} is torch.int32"):
        load_integrator(path)
    resized = dict(state, **{name: torch.zeros(*state[name].shape, 2)})
    save_file(resized, str(path), metadata=meta)
    with pytest.raises(FormatError, match="integ.safetensors: weights do not fit the config"):
        load_integrator(path)


def test_shipped_default_loads():
    model = load_integrator("default")
    assert model.side == 15 and not model.training


def _profile(side: int, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side] - side // 2
    p = np.exp(-0.5 * (xx ** 2 + yy ** 2) / sigma ** 2)
    return p / p.sum()


def _boxes_from_rates(lam: np.ndarray, rng: np.random.Generator) -> Shoeboxes:
    n = lam.shape[0]
    zeros = np.zeros(n)
    return Shoeboxes(rng.poisson(lam).astype(np.float32), np.ones(lam.shape, bool),
                     zeros.astype(np.int32), zeros, zeros, np.full(n, 0.3),
                     np.zeros((n, 2), np.float32), np.ones(n), np.full(n, 0.01, np.float32))


def test_profile_noise_terms_equal_the_dense_generalised_least_squares():
    """The Woodbury 2x2 algebra against the dense covariance diag(lam) + tau^2 I^2 (P - pp')^2
    restricted to the valid pixels (float64, masked pixels included)."""
    rng = np.random.default_rng(7)
    model = build_model()
    n, npix, tau = 5, 49, 0.7
    p = rng.random((n, npix)) ** 3
    p /= p.sum(1, keepdims=True)
    big_i, big_b = rng.uniform(50, 500, n), rng.uniform(0.1, 2, n)
    lam = big_i[:, None] * p + big_b[:, None] + 0.01
    m = (rng.random((n, npix)) > 0.2).astype(float)
    r = m * rng.normal(0, 3, (n, npix))
    score, info = model.profile_noise_terms(
        tau, *(torch.tensor(a, dtype=torch.float64) for a in (big_i, big_b, lam, r, m, p)))
    for k in range(n):
        o = m[k] > 0
        shape = np.diag(p[k]) - np.outer(p[k], p[k])
        cov = np.diag(lam[k]) + (tau * big_i[k]) ** 2 * shape @ shape.T
        prec = np.linalg.inv(cov[np.ix_(o, o)])
        jac = np.stack([big_i[k] * p[k], np.full(npix, big_b[k])], 1)[o]
        np.testing.assert_allclose(info[k].numpy(), jac.T @ prec @ jac, rtol=1e-8)
        np.testing.assert_allclose(score[k].numpy(), jac.T @ prec @ r[k][o], rtol=1e-8,
                                   atol=1e-10)


def test_profile_noise_accounts_for_a_wrong_profile():
    """Bright spots 20 % wider than the profile the fit is given: the plain Poisson posterior is
    overconfident and low; with the shape error (tau 2.5, the shipped value) sigma covers the
    error and the bias shrinks.  A tiny tau is the plain model."""
    rng = np.random.default_rng(8)
    model = build_model()
    n, side = 2000, model.side
    truth = rng.uniform(500, 5000, n)
    lam = truth[:, None, None] * _profile(side, 1.2) + rng.uniform(0.1, 1, n)[:, None, None]
    data = to_tensors(_boxes_from_rates(lam, rng))
    p = torch.tensor(_profile(side, 1.0).ravel(), dtype=torch.float32).expand(n, -1)
    results = {}
    with torch.no_grad():
        model.prior_log_mean.fill_(np.log(5000.0))
        model.prior_wilson_b.fill_(0.0)
        y, m, v = model.counts(data["pixels"], data["mask"], data["read_noise"])
        priors = model.priors(data["one_over_d"])
        for tau in (0.0, 1e-4, 2.5):
            mu, cov = model.fit(y, m, v, p, *priors, profile_noise=tau)
            s = model.summary({"mu": mu, "cov": cov, "p": p, "m": m})
            mean, sd = s["photons"].numpy(), s["photons_sigma"].numpy()
            results[tau] = (mean, np.sqrt(np.mean(((mean - truth) / sd) ** 2)))
    np.testing.assert_allclose(results[1e-4][0], results[0.0][0], rtol=1e-4)
    assert results[0.0][1] > 1.3
    assert 0.9 < results[2.5][1] < 1.15
    bias = {tau: abs(np.mean(results[tau][0] / truth - 1)) for tau in (0.0, 2.5)}
    assert bias[2.5] < 0.5 * bias[0.0]


def test_posterior_moments_are_calibrated_for_spots_drawn_from_the_prior():
    """Truth drawn from the model's own priors and the profile it is given: the exact moments
    (quadrature) have unit z spread among the weak spots (own I/sigma < 2), where the log-normal
    q's moments overstate sigma (z RMS ~0.8 here)."""
    rng = np.random.default_rng(9)
    model = build_model()
    n, side = 4000, model.side
    with torch.no_grad():
        model.prior_log_mean.fill_(np.log(10.0))
        model.prior_wilson_b.fill_(0.0)
        model.prior_log_shape.fill_(np.log(3.0))
        model.bg_log_mean.fill_(np.log(0.5))
        model.bg_log_shape.fill_(np.log(20.0))
        (shape, scale), _ = model.priors(torch.full((n,), 0.3))
    truth = scale.numpy() * (rng.random(n) ** (-1 / shape.numpy()) - 1)  # Lomax draws
    background = rng.gamma(20.0, 0.5 / 20.0, n)
    lam = truth[:, None, None] * _profile(side, 1.0) + background[:, None, None]
    data = to_tensors(_boxes_from_rates(lam, rng))
    p = torch.tensor(_profile(side, 1.0).ravel(), dtype=torch.float32).expand(n, -1)
    with torch.no_grad():
        y, m, v = model.counts(data["pixels"], data["mask"], data["read_noise"])
        prior_i, prior_b = model.priors(data["one_over_d"])
        mu, cov = model.fit(y, m, v, p, prior_i, prior_b)
        out = {"y": y, "m": m, "v": v, "p": p, "prior_i": prior_i, "prior_b": prior_b,
               "mu": mu, "cov": cov, "mu_p": mu, "cov_p": cov}
        exact = [t.numpy() for t in model.moments(out)]
        lognormal = model.summary({k: out[k] for k in ("mu", "cov", "p", "m")})
    spreads = {}
    for name, (mean, sd) in {"exact": exact, "lognormal": (lognormal["photons"].numpy(),
                                                           lognormal["photons_sigma"].numpy())
                             }.items():
        weak = mean / sd < 2
        assert weak.sum() > 1000
        spreads[name] = np.sqrt(np.mean(((mean - truth) / sd)[weak] ** 2))
    assert 0.93 < spreads["exact"] < 1.07
    assert spreads["lognormal"] < 0.9


def test_profile_noise_selection_picks_the_calibrated_value_and_restores_the_config():
    from peaknet_xtal.integration.evaluation import select_profile_noise

    rng = np.random.default_rng(10)
    model = build_model()
    n, side = 1500, model.side
    truth = rng.uniform(500, 5000, n)
    boxes = _boxes_from_rates(truth[:, None, None] * _profile(side, 1.2)
                              + rng.uniform(0.1, 1, n)[:, None, None], rng)
    boxes.extra = {"photons": truth}
    wrong = torch.tensor(_profile(side, 1.0).ravel(), dtype=torch.float32)
    model.profile = lambda h: wrong.expand(h.shape[0], -1)  # the fit is given a wrong shape
    with torch.no_grad():
        model.prior_log_mean.fill_(np.log(5000.0))
        model.prior_wilson_b.fill_(0.0)
    best, scores = select_profile_noise(model, boxes, grid=(0.0, 2.5))
    assert best == 2.5 and [s["profile_noise"] for s in scores] == [0.0, 2.5]
    assert scores[1]["score"] < scores[0]["score"]
    assert model.config["profile_noise"] == 0.0


def test_shipped_default_carries_its_selected_profile_noise():
    import json

    from peaknet_xtal.integration.weights import default_path

    config = json.loads(default_path().with_suffix(".json").read_text())
    model = load_integrator("default")
    assert model.config["profile_noise"] == config["profile_noise"] > 0
    assert config["extra"]["profile_noise_selection"]["chosen"] == config["profile_noise"]
