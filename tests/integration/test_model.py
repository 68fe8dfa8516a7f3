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
    """Shape-only execution on torch's meta device: no tensor is pinned to the CPU."""
    model = build_model().to("meta")
    n, side = 3, model.side
    out = model(torch.zeros(n, side, side, device="meta"),
                torch.ones(n, side, side, dtype=torch.bool, device="meta"),
                torch.zeros(n, device="meta"), torch.zeros(n, N_META, device="meta"),
                torch.zeros(n, device="meta"))
    assert out["mu"].device.type == "meta" and out["mu"].shape == (n, 2)
    assert out["cov"].shape == (n, 2, 2) and out["p"].shape == (n, side * side)
    assert model.elbo(out, samples=2).shape == (n,)


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


def test_shipped_default_loads():
    model = load_integrator("default")
    assert model.side == 15 and not model.training
