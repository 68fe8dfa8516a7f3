"""The fused CPU inference form (``model.fast``): the same function as the plain model, the same
peaks through the engine, and the plain model left as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.model import create_model
from peaknet_xtal.model.fast import (
    FastSeparableConvNorm,
    FusedConvNeXtBlock,
    PhaseConvTranspose,
    _order_quantiles,
    fast_standardise,
    fuse_for_inference,
)
from peaknet_xtal.model.layers.local_norm import local_normalise
from peaknet_xtal.model.layers.standardise import standardise

torch.set_num_threads(1)

#: float32 rounding of sums taken in another order, through a few dozen layers
PROB_ATOL = 1e-5


def _random_model(name: str = "yocto", seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A model whose GRN and norm parameters are not at their identity init (fresh GRNs have
    gamma = beta = 0, which would make the GRN fold trivially exact)."""
    torch.manual_seed(seed)
    model = create_model(name, **overrides).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "grn" in param_name or "norm" in param_name:
                param.add_(0.5 * torch.randn_like(param))
    return model


def test_fused_model_computes_the_same_logits_and_leaves_the_original_alone():
    model = _random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    kinds = {type(m) for m in fused.modules()}
    assert {FusedConvNeXtBlock, FastSeparableConvNorm, PhaseConvTranspose} <= kinds
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.poisson(4.0, (3, 1, 96, 130)).astype(np.float32))
    x[1, 0, 10:30, 40:60] += 400.0  # a bright blob: large activations through the GRNs
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[2, 0, :, :7] = False
    with torch.inference_mode():
        plain, fast = model(x, mask), fused(x, mask)
        single = fused(x[1:2], mask[1:2])  # per-image GRN scale: batching must not mix images
    scale = plain.abs().max().item()
    assert scale > 1.0
    torch.testing.assert_close(fast, plain, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(single, fast[1:2], atol=1e-5 * scale, rtol=1e-5)
    assert torch.equal(fast[2, :, :, :7], plain[2, :, :, :7])  # masked pixels: forced background


@pytest.mark.parametrize("fused", [False, True])
def test_peak_logit_is_the_difference_of_the_two_logits(fused):
    """``peak_logit`` carries one channel through the head's full-resolution steps; it equals the
    peak logit minus the background one of ``forward`` (masked pixels too), plain and fused, and
    the engine's probabilities (through it) are the softmax of its logits (``predict_logits``)."""
    model = _random_model()
    model = fuse_for_inference(model) if fused else model
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.poisson(4.0, (2, 1, 96, 130)).astype(np.float32))
    x[0, 0, 40:43, 50:53] += 300.0
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 0, 20:30, :] = False
    with torch.inference_mode():
        logits, difference = model(x, mask), model.peak_logit(x, mask)
    assert difference.shape == (2, 1, 96, 130)
    expected = logits[:, 1:2] - logits[:, 0:1]
    scale = expected.abs().max().item()
    torch.testing.assert_close(difference, expected, atol=1e-5 * scale, rtol=1e-5)
    engine = InferenceEngine(model, device="cpu", threads=1, fast=False)
    panel = x[0, 0].numpy()
    (prob,), (raw,) = engine.predict_panels([panel]), engine.predict_logits([panel])
    np.testing.assert_allclose(prob, torch.softmax(torch.from_numpy(raw), 0)[1].numpy(),
                               atol=PROB_ATOL, rtol=0)


@pytest.mark.parametrize("norm_noise", ["pixel", "sum2x2"])
def test_swift_fuses_and_computes_the_same_logits(norm_noise):
    """The CPU default's architecture (three levels, no BiFPN blocks, local normalisation, with
    either noise scale) goes through the same fused form: its blocks and head are replaced, its
    input normalisation is the model's own, its output is unchanged."""
    model = _random_model("swift", seed=3, norm_noise=norm_noise)
    fused = fuse_for_inference(model)
    kinds = {type(m) for m in fused.modules()}
    assert {FusedConvNeXtBlock, PhaseConvTranspose} <= kinds
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.poisson(4.0, (2, 1, 80, 112)).astype(np.float32))
    x[0, 0, 20:23, 30:33] += 300.0
    with torch.inference_mode():
        plain, fast = model(x), fused(x)
        valid = torch.ones_like(x, dtype=torch.bool)
        assert torch.equal(fused.normalise(x, valid),
                           local_normalise(x, valid, 16, noise_scale=norm_noise))
    scale = plain.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(fast, plain, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize(("stride", "bias", "shape"),
                         [(4, True, (7, 9)), (2, False, (5, 3)), (8, True, (1, 4))])
def test_phase_conv_transpose_is_the_transposed_conv(stride, bias, shape):
    torch.manual_seed(stride)
    conv = torch.nn.ConvTranspose2d(6, 3, stride + 2, stride=stride, padding=1, bias=bias)
    x = torch.randn(2, 6, *shape)
    with torch.no_grad():
        torch.testing.assert_close(PhaseConvTranspose(conv)(x), conv(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="stride s"):
        PhaseConvTranspose(torch.nn.ConvTranspose2d(6, 3, stride + 3, stride=stride, padding=1))


def test_order_quantiles_are_torch_quantiles_bit_for_bit():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 1000, 35_890):
        sample = torch.from_numpy(rng.gamma(2.0, 30.0, n).astype(np.float32))
        expected = torch.quantile(sample, torch.tensor([0.5, 0.99]))
        got = _order_quantiles(sample, (0.5, 0.99))
        assert [g.item() for g in got] == expected.tolist(), n


def test_fast_standardise_matches_standardise():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(100.0, 8.0, (2, 1, 64, 96)).astype(np.float32))
    x[0, 0, 5, 5] = 1e6
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, 0, 20:40] = False
    valid[0, 0, 5, 5] = False
    flat = torch.zeros(1, 1, 32, 32)  # no spread: unit scale in both
    for xs, vs in ((x, valid), (flat, torch.ones_like(flat, dtype=torch.bool))):
        torch.testing.assert_close(fast_standardise(xs, vs), standardise(xs, vs),
                                   atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def simulated_frame(real_data):
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig, simulate_frame

    geometry = read_geometry(real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom")
    frame, _ = simulate_frame(geometry, 17, SimConfig(adu_per_photon=10.0, hit_probability=1.0))
    keep = slice(0, 8)  # eight 185 x 194 CSPAD panels: small, still a frame with peaks
    return type(frame)(panels=frame.panels[keep],
                       masks=None if frame.masks is None else frame.masks[keep],
                       geometry=None, meta=frame.meta)


def test_engine_fast_path_gives_the_plain_probabilities_and_peaks(simulated_frame):
    """The default CPU path (fused) against ``fast=False`` (the layers as trained), shipped model.
    """
    plain = InferenceEngine("default", device="cpu", threads=1, fast=False, keep_prob_maps=True)
    fast = InferenceEngine("default", device="cpu", threads=1, keep_prob_maps=True)
    (a,), (b,) = plain.find_frames([simulated_frame]), fast.find_frames([simulated_frame])
    assert getattr(fast.model(), "fused_for_inference", False)
    assert not getattr(plain.model(), "fused_for_inference", False)
    for pa, pb in zip(a.prob_maps, b.prob_maps, strict=True):
        np.testing.assert_allclose(pb, pa, atol=PROB_ATOL, rtol=0)
    assert len(a.peaks) >= 5  # a hit: the comparison below is about real peaks
    assert a.peaks.dtype == b.peaks.dtype and len(a.peaks) == len(b.peaks)
    for name in a.peaks.dtype.names:  # same pixels, so the same positions and intensities
        if name == "prob":  # the mean peak probability carries the rounding difference
            np.testing.assert_allclose(b.peaks[name], a.peaks[name], atol=PROB_ATOL, rtol=0)
        else:
            np.testing.assert_array_equal(b.peaks[name], a.peaks[name], err_msg=name)
