"""Local input normalisation (peaknet_xtal/model/layers/local_norm.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from peaknet_xtal.model.layers import standardise
from peaknet_xtal.model.layers.local_norm import (
    COUNT_DITHER,
    NOISE_SCALES,
    background_maps,
    dequantise_counts,
    exact_counts,
    fast_asinh,
    local_normalise,
)
from peaknet_xtal.sim.artifacts import correlated_noise

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _z(image: np.ndarray, valid: np.ndarray | None = None, local: bool = True,
       noise_scale: str = "pixel") -> np.ndarray:
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    v = torch.ones_like(x, dtype=torch.bool) if valid is None else torch.from_numpy(valid)[None,
                                                                                           None]
    out = local_normalise(x, v, noise_scale=noise_scale) if local else standardise(x, v)
    return out[0, 0].numpy()


def _spot(shape: tuple[int, int], centre: tuple[int, int], height: float,
          sigma: float = 0.7) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return height * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma ** 2))


def _strong_background(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """~3,000 ADU with a 1,300-ADU wave and an 800-ADU ramp, 33 ADU correlated noise."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    smooth = 2500 + 1300 * np.sin(xx / 300.0) + 800 * yy / shape[0]
    return smooth + 33 * correlated_noise(rng, shape, 0.6)


@pytest.mark.parametrize("noise_scale", NOISE_SCALES)
def test_spot_on_a_strong_smooth_background_stands_out_like_on_an_empty_one(noise_scale):
    rng = np.random.default_rng(1)
    shape, centre = (256, 256), (120, 140)
    spot = _spot(shape, centre, 300.0)  # ~10 % of the 3,000-ADU background
    strong = _strong_background(rng, shape) + spot
    empty = rng.poisson(0.05, shape) * 30.0 + spot  # photon counting, 30 ADU per photon
    away = np.ones(shape, bool)
    away[centre[0] - 4:centre[0] + 5, centre[1] - 4:centre[1] + 5] = False
    for image in (strong, empty):
        z = _z(image, noise_scale=noise_scale)
        assert z[centre] > np.quantile(z[away], 0.9999), "the spot must be the brightest thing"
        assert np.sinh(z[centre]) > 5.0
    # the cause the local normalisation removes: one global sigma from the background's range
    zg = _z(strong, local=False)
    assert np.sinh(zg[centre]) < 1.5


@pytest.mark.parametrize("noise_scale", NOISE_SCALES)
def test_a_large_smooth_gradient_barely_changes_the_input(noise_scale):
    rng = np.random.default_rng(2)
    shape = (256, 320)
    image = _strong_background(rng, shape) + _spot(shape, (128, 160), 400.0)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    ramp = 3000.0 * xx / shape[1] + 1500.0 * yy / shape[0]  # ~10 ADU per pixel
    z0, z1 = _z(image, noise_scale=noise_scale), _z(image + ramp, noise_scale=noise_scale)
    inner = (slice(32, -32), slice(32, -32))
    assert np.abs(z1 - z0)[inner].mean() < 0.05
    assert abs(z1[128, 160] - z0[128, 160]) < 0.3


@pytest.mark.parametrize("noise_scale", NOISE_SCALES)
def test_gain_scaling_changes_nothing(noise_scale):
    rng = np.random.default_rng(3)
    image = _strong_background(rng, (128, 128))
    np.testing.assert_allclose(_z(image * 37.0, noise_scale=noise_scale),
                               _z(image, noise_scale=noise_scale), atol=2e-3)


@pytest.mark.parametrize("noise_scale", NOISE_SCALES)
def test_panel_alone_equals_panel_inside_a_layout_with_masked_gaps(noise_scale):
    rng = np.random.default_rng(4)
    panel = _strong_background(rng, (185, 194)) + _spot((185, 194), (90, 100), 500.0)
    layout = np.full((400, 480), 7.0e4, np.float32)  # gap values that must never matter
    valid = np.zeros(layout.shape, bool)
    y0, x0 = 64, 160  # multiples of the 16-px cells
    layout[y0:y0 + 185, x0:x0 + 194] = panel
    valid[y0:y0 + 185, x0:x0 + 194] = True
    if noise_scale != "decorrelated":  # that one has one factor per image: a panel's own
        # other panels of the layout, beyond a masked gap wider than two cells
        layout[:, 400:] = rng.normal(100.0, 5.0, (400, 80))
        valid[:, 400:] = True
    np.testing.assert_allclose(_z(layout, valid, noise_scale=noise_scale)[y0:y0 + 185,
                                                                          x0:x0 + 194],
                               _z(panel, noise_scale=noise_scale), atol=1e-5)


@pytest.mark.parametrize("noise_scale", NOISE_SCALES)
def test_masked_and_non_finite_pixels_are_zero_and_do_not_leak(noise_scale):
    rng = np.random.default_rng(5)
    image = _strong_background(rng, (96, 96))
    valid = np.ones(image.shape, bool)
    valid[40:44, :] = False
    poisoned = image.copy()
    poisoned[40:44, :] = 1e9
    poisoned[10, 10] = np.nan
    valid_p = valid.copy()
    valid_p[10, 10] = False
    z = _z(poisoned, valid_p, noise_scale=noise_scale)
    assert np.all(z[~valid_p] == 0) and np.all(np.isfinite(z))
    assert np.abs(z[valid_p]).max() < 10


@pytest.mark.parametrize("noise_scale", NOISE_SCALES)
def test_photon_counting_empty_panel_has_a_finite_scale(noise_scale):
    z = _z(np.zeros((64, 64)), noise_scale=noise_scale)
    assert np.all(z == 0)
    image = np.zeros((64, 64))
    image[5, 5] = 1.0
    assert np.isfinite(_z(image, noise_scale=noise_scale)).all()


def test_maps_reject_bad_shapes():
    with pytest.raises(ValueError, match="B, 1, H, W"):
        background_maps(torch.zeros(4, 4), torch.ones(4, 4, dtype=torch.bool))


def test_model_config_selects_the_normaliser_and_old_configs_keep_the_global_one():
    from peaknet_xtal.model import build_from_config, create_model

    torch.manual_seed(0)
    local = create_model("yocto", input_norm="local").eval()
    x = torch.from_numpy(_strong_background(np.random.default_rng(6), (64, 96))
                         .astype(np.float32))[None, None]
    valid = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        whole = local(x)
        pre = local(local.normalise(x, valid), valid, normalised=True)
        np.testing.assert_allclose(pre.numpy(), whole.numpy(), atol=1e-5)
        np.testing.assert_allclose(local.normalise(x, valid)[0, 0].numpy(), _z(x[0, 0].numpy()),
                                   atol=1e-6)
    old = dict(local.config)
    old.pop("input_norm")
    old.pop("norm_block")
    rebuilt = build_from_config(old)  # a config saved before the local normaliser existed
    assert rebuilt.config["input_norm"] == "global"
    np.testing.assert_allclose(rebuilt.normalise(x, valid).numpy(),
                               standardise(x, valid).numpy())
    with pytest.raises(ValueError, match="input_norm"):
        create_model("yocto", input_norm="nearby")
    # the noise scale is per model too; configs saved before it existed keep the pixel one
    assert "norm_noise" not in old or old.pop("norm_noise") == "pixel"
    old["input_norm"] = "local"
    assert build_from_config(old).config["norm_noise"] == "pixel"
    summed = create_model("yocto", input_norm="local", norm_noise="sum2x2").eval()
    np.testing.assert_allclose(summed.normalise(x, valid)[0, 0].numpy(),
                               _z(x[0, 0].numpy(), noise_scale="sum2x2"), atol=1e-6)
    assert not np.allclose(summed.normalise(x, valid).numpy(), local.normalise(x, valid).numpy(),
                           atol=1e-3)
    with pytest.raises(ValueError, match="norm_noise"):
        create_model("yocto", input_norm="local", norm_noise="blob")


def _noise_ratio(image: np.ndarray) -> float:
    """Median over the inner pixels of the 2 x 2-sum noise map over the per-pixel one."""
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    v = torch.ones_like(x, dtype=torch.bool)
    _, pixel = background_maps(x, v)
    _, summed = background_maps(x, v, noise_scale="sum2x2")
    assert (summed >= pixel).all(), "the sum scale is never below the pixel scale"
    inner = (slice(32, -32), slice(32, -32))
    return float((summed[0, 0] / pixel[0, 0])[inner].median())


def _sum_excess(noise: np.ndarray) -> float:
    """How much more a 2 x 2 sum of ``noise`` spreads than the sum of four independent pixels
    with the same per-pixel spread (1 on white noise)."""
    h, w = (noise.shape[0] // 2) * 2, (noise.shape[1] // 2) * 2
    n = noise[:h, :w]
    sums = n[::2, ::2] + n[1::2, ::2] + n[::2, 1::2] + n[1::2, 1::2]
    return float(sums.std() / (2 * n.std()))


def test_sum_scale_equals_the_pixel_scale_on_white_noise():
    rng = np.random.default_rng(11)
    image = 3000.0 + 33.0 * rng.normal(size=(384, 384))
    assert abs(_noise_ratio(image) - 1.0) < 0.05
    # photon counting, sparse: single photons keep their scale (the pixel fallback wins); at a
    # fractional gain, as an integrating detector at low flux (exact counts get dequantised)
    sparse = rng.poisson(0.03, (256, 256)) * 29.7
    np.testing.assert_array_equal(_z(sparse, noise_scale="sum2x2"), _z(sparse))


@pytest.mark.parametrize("psf", [0.5, 0.8])
def test_sum_scale_grows_by_the_noise_excess_of_a_sum_on_blurred_noise(psf):
    rng = np.random.default_rng(12)
    noise = correlated_noise(rng, (384, 384), psf)
    expected = _sum_excess(noise)
    assert expected > 1.2  # blurred noise: a sum spreads more than uncorrelated pixels
    image = 3000.0 + 33.0 * noise
    assert _noise_ratio(image) == pytest.approx(expected, rel=0.06)
    # the normalised input (before its asinh): 2 x 2 sums of it now spread like those of white
    # noise's input
    white = np.sinh(_z(3000.0 + 33.0 * rng.normal(size=(384, 384)), noise_scale="sum2x2"))
    blurred = np.sinh(_z(image, noise_scale="sum2x2"))
    inner = (slice(32, -32), slice(32, -32))

    def sum_std(z: np.ndarray) -> float:
        z = z[inner]
        return float((z[::2, ::2] + z[1::2, ::2] + z[::2, 1::2] + z[1::2, 1::2]).std())

    assert sum_std(blurred) == pytest.approx(sum_std(white), rel=0.1)
    # the per-pixel scale leaves the excess
    assert sum_std(np.sinh(_z(image))) > 1.15 * sum_std(white)


def test_unknown_noise_scale_is_refused():
    with pytest.raises(ValueError, match="noise_scale"):
        background_maps(torch.zeros(1, 1, 32, 32), torch.ones(1, 1, 32, 32, dtype=torch.bool),
                        noise_scale="blob")


def test_decorrelated_input_is_the_pixel_input_on_white_noise_and_photon_counting():
    rng = np.random.default_rng(13)
    white = 3000.0 + 33.0 * rng.normal(size=(384, 384))
    np.testing.assert_allclose(_z(white, noise_scale="decorrelated"), _z(white), atol=0.03)
    sparse = rng.poisson(0.03, (256, 256)) * 29.7  # ADU, not exact counts: not dequantised
    np.testing.assert_array_equal(_z(sparse, noise_scale="decorrelated"), _z(sparse))
    dense = rng.poisson(2.0, (256, 256)) * 29.7  # photon counting at two photons a pixel
    pixel, decorrelated = np.sinh(_z(dense)), np.sinh(_z(dense, noise_scale="decorrelated"))
    moved = pixel != 0  # pixels at their background are 0 in both
    assert np.median(pixel[moved] / decorrelated[moved]) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("psf", [0.5, 0.8])
def test_decorrelated_input_spreads_like_white_noise_in_spot_sized_sums(psf):
    rng = np.random.default_rng(14)
    blurred = 3000.0 + 33.0 * correlated_noise(rng, (384, 384), psf)
    white = 3000.0 + 33.0 * rng.normal(size=(384, 384))
    inner = (slice(32, -32), slice(32, -32))

    def half_sum_std(z: np.ndarray) -> float:
        z = np.sinh(z)[inner]
        return float(((z[::2, ::2] + z[1::2, ::2] + z[::2, 1::2] + z[1::2, 1::2]) / 2).std())

    reference = half_sum_std(_z(white, noise_scale="decorrelated"))
    assert half_sum_std(_z(blurred)) > 1.2 * reference  # the pixel scale leaves the excess
    assert half_sum_std(_z(blurred, noise_scale="decorrelated")) == pytest.approx(reference,
                                                                                 rel=0.08)


def test_decorrelation_is_per_panel_of_a_batch():
    rng = np.random.default_rng(15)
    white = 3000.0 + 33.0 * rng.normal(size=(256, 256))
    blurred = 3000.0 + 33.0 * correlated_noise(rng, (256, 256), 0.8)
    x = torch.from_numpy(np.stack([white, blurred]).astype(np.float32))[:, None]
    v = torch.ones_like(x, dtype=torch.bool)
    both = local_normalise(x, v, noise_scale="decorrelated")[:, 0].numpy()
    np.testing.assert_array_equal(both[0], _z(white, noise_scale="decorrelated"))
    np.testing.assert_array_equal(both[1], _z(blurred, noise_scale="decorrelated"))
    assert not np.allclose(both[1], _z(blurred), atol=0.05)


def test_fast_asinh_is_asinh_to_float32_rounding_over_every_magnitude():
    """The CPU form (logs and roots through numpy) against float64's asinh: zero, tiny, noise,
    spot, hot-pixel and near-overflow magnitudes of both signs, infinities and NaN."""
    rng = np.random.default_rng(3)
    magnitudes = np.concatenate([np.zeros(1), 10.0 ** rng.uniform(-8, 38, 20_000),
                                 rng.normal(size=20_000)])
    values = np.concatenate([magnitudes, -magnitudes, [np.inf, -np.inf]]).astype(np.float32)
    got = fast_asinh(torch.from_numpy(values)).numpy()
    exact = np.arcsinh(values.astype(np.float64))
    assert got.dtype == np.float32 and got.shape == values.shape
    finite = np.isfinite(exact)
    assert np.all(np.abs(got[finite] - exact[finite]) <= 4e-7 * np.maximum(1.0, np.abs(
        exact[finite])))
    assert np.array_equal(got[~finite], exact[~finite].astype(np.float32))
    assert np.isnan(fast_asinh(torch.tensor([float("nan")]))).all()
    # a tensor that needs a gradient keeps torch's differentiable asinh
    t = torch.tensor([0.5, -3.0], requires_grad=True)
    fast_asinh(t).sum().backward()
    assert torch.allclose(t.grad, 1 / torch.sqrt(t.detach() ** 2 + 1))


def test_clipped_spreads_through_numpy_equal_the_torch_ones():
    """The CPU form of the decorrelation's clipped spread (numpy, float64 sums) against the
    torch form that gradients and GPUs use: rows with outliers to clip, masked values, a row of
    one valid value and a sparse photon-count row (clipping would take too many: spread 0)."""
    from peaknet_xtal.model.layers.local_norm import _clipped_std

    rng = np.random.default_rng(5)
    values = rng.normal(0.0, 2.0, (5, 4000)).astype(np.float32)
    values[0, :20] = 80.0  # spots: clipped away
    values[3] = (rng.random(4000) < 0.01).astype(np.float32)  # single photons among zeros
    ok = rng.random((5, 4000)) > 0.1
    ok[2] = False
    ok[2, 7] = True
    v, m = torch.from_numpy(values), torch.from_numpy(ok)
    cpu = _clipped_std(v, m)
    reference = _clipped_std(v.clone().requires_grad_(True), m)
    assert cpu.dtype == reference.dtype == torch.float64
    assert torch.allclose(cpu, reference.detach(), rtol=1e-9, atol=0)
    assert cpu[2] == 0 and cpu[3] == 0 and 1.9 < cpu[0] < 2.1


def _tail(image: np.ndarray, beyond: float = 5.0) -> float:
    """Share of pixels the normalised input puts beyond ``beyond`` noise units."""
    return float(np.mean(np.sinh(_z(image, noise_scale="decorrelated")) > beyond))


@pytest.mark.parametrize("photons", [0.2, 0.5])
def test_exact_counts_read_like_counts_with_read_noise(photons):
    """Whole counts at a fraction of a photon a pixel: quantile statistics of zeros and ones made
    single photons look like many sigma; dequantised, the tail is that of the same counts with
    the read noise the network was trained on."""
    rng = np.random.default_rng(21)
    counts = rng.poisson(photons, (256, 256)).astype(np.float64)
    noisy = counts + rng.normal(0.0, COUNT_DITHER, counts.shape)
    exact, with_noise = _tail(counts), _tail(noisy)
    assert exact < 1.5 * with_noise
    # the cause: the same counts not taken for exact ones (a thousandth of a photon off whole)
    assert _tail(counts + 1e-3) > 3 * with_noise


def test_dequantising_is_repeatable_per_panel_and_varies_between_frames():
    rng = np.random.default_rng(22)
    a = torch.from_numpy(rng.poisson(0.3, (1, 1, 64, 80)).astype(np.float32))
    b = a.clone()
    b[0, 0, 10, 20] += 1.0  # the next frame: one more count, another window of the noise
    v = torch.ones_like(a, dtype=torch.bool)
    np.testing.assert_array_equal(dequantise_counts(a, v).numpy(),
                                  dequantise_counts(a.clone(), v).numpy())
    da, db = dequantise_counts(a, v) - a, dequantise_counts(b, v) - b
    assert not torch.equal(da, db)
    assert abs(float(da.std()) - COUNT_DITHER) < 0.05 and abs(float(da.mean())) < 0.05


def test_only_exact_counts_are_dequantised_in_quanta_of_their_smallest_count():
    rng = np.random.default_rng(23)
    counts = rng.poisson(0.5, (64, 64)).astype(np.float32)
    ok = np.ones(counts.shape, bool)
    assert exact_counts(counts, ok) is not None
    assert exact_counts(counts + 0.25, ok) is None  # float data
    assert exact_counts(np.zeros_like(counts), ok) is None  # nothing counted: a dead panel
    negative = counts.copy()
    negative[3, 3] = -1.0  # a Pilatus gap value ...
    assert exact_counts(negative, ok) is None
    ok[3, 3] = False  # ... masked, as the detector's trusted range masks it
    assert exact_counts(negative, ok) == (int(counts.sum() - counts[3, 3]), 1.0)
    nan = counts.copy()
    nan[5, 5] = np.nan
    assert exact_counts(nan, np.ones(counts.shape, bool)) is None
    x = torch.from_numpy(counts * 30.0)[None, None]  # counts stored at 30 ADU a photon
    moved = dequantise_counts(x, torch.ones_like(x, dtype=torch.bool)) - x
    assert abs(float(moved.std()) - 30.0 * COUNT_DITHER) < 1.0
    floats = torch.from_numpy(counts + 0.25)[None, None]
    assert dequantise_counts(floats, torch.ones_like(floats, dtype=torch.bool)) is floats


def test_the_device_path_of_the_count_check_and_dither_gives_the_host_answers():
    """Off the CPU the exact-count check and the dither run on the tensors' device (one wait in
    all); here that torch code runs on the CPU against the numpy code the CPU takes."""
    from peaknet_xtal.model.layers.local_norm import _device_counts, _host_counts, dither_noise

    rng = np.random.default_rng(25)
    counts = rng.poisson(0.7, (6, 90, 130)).astype(np.float32)
    ok = np.ones(counts.shape, bool)
    counts[1] += 0.5  # float data
    counts[2, 4, 4] = -1.0  # a gap value, unmasked ...
    counts[3, 4, 4] = -1.0  # ... and masked, with the first rows and columns
    ok[3, 4, 4] = False
    ok[3, :7] = ok[3, :, :11] = False
    counts[4, 50, 60] = np.nan
    counts[5] = 0.0  # nothing counted
    counts[0] *= 30.0  # counts at 30 ADU a photon
    device = _device_counts(torch.from_numpy(counts), torch.from_numpy(ok))
    host = [_host_counts(counts[i], ok[i]) for i in range(len(counts))]
    assert device == host
    assert [d is None for d in device] == [False, True, True, False, True, True]
    assert device[3][1] == (7, 11) and device[0][0] == 30.0
    lifted = np.stack([counts[0] / 30.0 * 7.0 + 300.0, counts[0] * 2.0])  # ADU on an offset;
    lifted_ok = np.ones(lifted.shape, bool)  # counts at 60 ADU a photon without a 1
    device = _device_counts(torch.from_numpy(lifted), torch.from_numpy(lifted_ok))
    assert device == [_host_counts(lifted[i], lifted_ok[i]) for i in range(2)]
    assert [quantum for quantum, _ in device] == [1.0, 60.0]
    big = rng.poisson(0.2, (2100, 1030)).astype(np.float32)  # blocks past the field's period
    big_ok = rng.random(big.shape) > 0.01
    for values, good, origin in ((counts[3], ok[3], (7, 11)), (counts[0], ok[0], (0, 0)),
                                 (big, big_ok, (3, 70))):
        on_host = dither_noise(good, values, origin)
        np.testing.assert_array_equal(
            dither_noise(torch.from_numpy(good), torch.from_numpy(values), origin).numpy(),
            on_host)
        assert not on_host[:origin[0]].any() and not on_host[:, :origin[1]].any()


def test_a_mask_moves_the_dither_of_the_blocks_it_touches_only():
    """A user's mask (a beam stop, a DIALS mask) leaves the noise given to the counts outside
    the blocks it touches as it was: one shift for the whole panel, set by its total count,
    moved the noise, and so the peaks, everywhere."""
    from peaknet_xtal.model.layers.local_norm import DITHER_BLOCK

    rng = np.random.default_rng(26)
    x = torch.from_numpy(rng.poisson(0.4, (1, 1, 300, 340)).astype(np.float32))
    valid = torch.ones_like(x, dtype=torch.bool)
    masked = valid.clone()
    masked[..., 140:170, 150:200] = False  # inside blocks (2, 2)-(2, 3)
    moved = (dequantise_counts(x, valid) != dequantise_counts(x, masked))[0, 0].numpy()
    touched = np.zeros(moved.shape, bool)
    touched[2 * DITHER_BLOCK:3 * DITHER_BLOCK, 2 * DITHER_BLOCK:4 * DITHER_BLOCK] = True
    assert moved[touched].mean() > 0.9 and not moved[~touched].any()
    more = x.clone()
    more[0, 0, 10, 300] += 1.0  # one photon more, in block (0, 4)
    moved = (dequantise_counts(x, valid) - x != dequantise_counts(more, valid) - more)[0, 0]
    block = moved[:DITHER_BLOCK, 4 * DITHER_BLOCK:5 * DITHER_BLOCK]
    assert block.float().mean() > 0.9 and int(moved.sum()) == int(block.sum())


def test_gap_values_marked_or_masked_give_the_same_dither():
    """Masked pixels' values never reach the dither: a gap written as 65535 and masked gives the
    noise of the same gap holding 0."""
    rng = np.random.default_rng(27)
    x = torch.from_numpy(rng.poisson(0.4, (1, 1, 130, 150)).astype(np.float32))
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[..., 60:62, :] = False
    gap = x.clone()
    gap[..., 60:62, :] = 65535.0
    zero = x.clone()
    zero[..., 60:62, :] = 0.0
    np.testing.assert_array_equal((dequantise_counts(gap, valid) - gap)[valid].numpy(),
                                  (dequantise_counts(zero, valid) - zero)[valid].numpy())


@pytest.mark.parametrize("noise_scale", ["pixel", "decorrelated"])
def test_exact_counts_alone_equal_the_same_counts_inside_a_masked_layout(noise_scale):
    """The dither is anchored at the valid pixels: a counting panel embedded in a larger masked
    image (on the 16-px cell grid, as the float test above) gets the same input."""
    rng = np.random.default_rng(24)
    panel = rng.poisson(0.4, (185, 194)).astype(np.float64)
    panel[90:93, 100:103] += 12.0  # a spot
    layout = np.full((400, 480), 7.0e4)
    valid = np.zeros(layout.shape, bool)
    y0, x0 = 64, 160
    layout[y0:y0 + 185, x0:x0 + 194] = panel
    valid[y0:y0 + 185, x0:x0 + 194] = True
    np.testing.assert_allclose(_z(layout, valid, noise_scale=noise_scale)[y0:y0 + 185,
                                                                          x0:x0 + 194],
                               _z(panel, noise_scale=noise_scale), atol=1e-5)


def test_finite_is_torch_isfinite_on_any_layout():
    from peaknet_xtal.model.layers.local_norm import finite

    x = torch.randn(3, 1, 17, 23)
    x[0, 0, 1, 2], x[1, 0, 5, 5], x[2, 0, 0, 0] = float("nan"), float("inf"), -float("inf")
    for t in (x, x[:, 0, ::2, 1::3], x.transpose(-1, -2), x.double()):
        assert torch.equal(finite(t), torch.isfinite(t))
    assert torch.equal(finite(x.requires_grad_()), torch.isfinite(x))


@pytest.fixture(params=[True, False], ids=["network", "np.sort"])
def sorting(request, monkeypatch):
    """Either way of sorting the cells (the network, or numpy's sort where that is faster)."""
    from peaknet_xtal.model.layers import local_norm

    monkeypatch.setattr(local_norm, "_network_pays", lambda: request.param)
    return request.param


@pytest.mark.usefixtures("sorting")
def test_the_sorting_network_gives_numpys_sorted_rows():
    """``sort_rows`` (a bitonic network across rows) against ``np.sort``: the same values on rows
    of every width (padded to a power of two), with infinities, ties and signed zeros, on too
    few rows for the network, and with a NaN (which goes to ``np.sort``: NaN last)."""
    from peaknet_xtal.model.layers.local_norm import sort_rows

    rng = np.random.default_rng(11)
    for width in (1, 2, 3, 9, 25, 64, 100):
        for rows in (3, 300, 1000):
            a = rng.normal(0.0, 5.0, (rows, width)).astype(np.float32)
            a[::5, :width // 2] = np.inf
            a[1::7, :1] = -np.inf
            a[2::3] = np.round(a[2::3])  # ties
            a[3::11] = 0.0
            a[4::11] = -0.0
            got = sort_rows(a)
            assert got.shape == a.shape and got.dtype == a.dtype
            assert np.array_equal(got, np.sort(a, axis=-1)), (width, rows)
    cells = rng.normal(size=(2, 3, 4, 64)).astype(np.float32)  # any leading shape
    assert np.array_equal(sort_rows(cells), np.sort(cells, axis=-1))
    with_nan = rng.normal(size=(500, 64)).astype(np.float32)
    with_nan[7, 3] = np.nan
    assert np.array_equal(sort_rows(with_nan), np.sort(with_nan, axis=-1), equal_nan=True)


@pytest.mark.usefixtures("sorting")
@pytest.mark.parametrize("noise_scale", ["pixel", "sum2x2"])
def test_background_maps_through_numpy_equal_those_through_torch(noise_scale):
    """The maps' cell statistics on the CPU go through numpy (one sorting network for all
    cells, the magnitudes' order merged from the residuals') and elsewhere, or with a gradient,
    through torch (two sorts per cell): the same maps to the last bit, on panels with masked
    pixels, empty cells, sparse photon counts and a panel smaller than a cell; and the numpy
    path is the one taken."""
    from peaknet_xtal.model.layers import local_norm

    rng = np.random.default_rng(12)
    images = [_strong_background(rng, (185, 194)), rng.poisson(0.1, (185, 194)) * 1.0]
    valid = np.ones((185, 194), bool)
    valid[30:70, 50:90] = False
    valid[rng.random(valid.shape) < 0.05] = False
    for image, mask in ((images[0], valid), (images[1], valid), (images[0][:7, :9], None)):
        x = torch.from_numpy(image.astype(np.float32))[None, None]
        v = (torch.ones_like(x, dtype=torch.bool) if mask is None
             else torch.from_numpy(mask)[None, None])
        cpu = background_maps(x, v, noise_scale=noise_scale)
        through_torch = background_maps(x.clone().requires_grad_(True), v,
                                        noise_scale=noise_scale)
        for a, b in zip(cpu, through_torch, strict=True):
            assert torch.equal(a, b.detach())
    calls = []
    host = local_norm._cell_noise_host

    def counted(*args: object) -> object:
        calls.append(1)
        return host(*args)  # type: ignore[arg-type]

    local_norm._cell_noise_host = counted  # type: ignore[assignment]
    try:
        background_maps(x, v, noise_scale=noise_scale)
    finally:
        local_norm._cell_noise_host = host
    assert calls


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(torch.isnan(a), torch.isnan(b))
                and torch.equal(a.nan_to_num(), b.nan_to_num()))


@pytest.mark.usefixtures("sorting")
@pytest.mark.parametrize("edge", ["finite", "infinite", "nan"])
def test_cell_statistics_through_numpy_equal_those_through_torch_on_every_count(edge):
    """Cell by cell, every count of valid samples from 0 to 64 (ranks and windows at each),
    ties, zeros of a photon count, a spot among the samples, signed values, and infinite or NaN
    samples: the numpy medians, noise and typical sizes against torch's, to the last bit."""
    from peaknet_xtal.model.layers.local_norm import (
        _cell_medians,
        _cell_medians_host,
        _cell_noise,
        _cell_noise_host,
        _cells,
    )

    rng = np.random.default_rng(15)
    block, cells = 16, 65 * 5
    values = rng.normal(0.0, 3.0, (cells, 8, 8)).astype(np.float32)
    values[65:130] = np.round(values[65:130])  # ties
    values[130:195] = (rng.random((65, 8, 8)) < 0.1).astype(np.float32)  # sparse counts
    values[195:260, 2, 3] = 500.0  # a spot
    values[260:] = np.abs(values[260:])  # one sign
    if edge != "finite":
        bad = np.inf if edge == "infinite" else np.nan
        values[::7, 1, 1], values[3::7, 0, 0] = bad, -bad
    ok = np.zeros((cells, 64), bool)
    for i in range(cells):
        ok[i, rng.permutation(64)[:i % 65]] = True
    ok = ok.reshape(cells, 8, 8)
    # the cells side by side: one image of 1 x 325 cells, at half resolution 8 x 2600
    xs = torch.from_numpy(np.ascontiguousarray(values.transpose(1, 0, 2)).reshape(1, 8, -1))
    vs = torch.from_numpy(np.ascontiguousarray(ok.transpose(1, 0, 2)).reshape(1, 8, -1))
    assert _same(_cell_medians_host(xs, vs, block),
                 _cell_medians(_cells(xs, block), _cells(vs, block)))
    for got, expected in zip(_cell_noise_host(xs, vs, block),
                             _cell_noise(_cells(xs, block), _cells(vs, block)), strict=True):
        assert _same(got, expected)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")  # the infinite rows
def test_clipped_spreads_without_np_where_equal_those_with_it():
    """The clipped spread's fast numpy path (values off ``ok`` and off the kept ones multiplied
    by 0) against the plain one that replaces them by 0 (``np.where``): the same float64
    results to the last bit, and the plain one wherever a value is not finite or deviations
    could overflow."""
    from peaknet_xtal.model.layers.local_norm import _clipped_std_numpy, _clipped_std_where

    rng = np.random.default_rng(13)
    values = rng.normal(0.0, 2.0, (6, 5000)).astype(np.float32)
    values[0, :30] = 80.0  # clipped away
    values[1, :10] = -60.0
    values[3] = (rng.random(5000) < 0.01).astype(np.float32)  # too many to clip: spread 0
    values[4, 100] = 2.0e38  # deviations beyond float32
    values[5, 9] = np.inf
    ok = rng.random(values.shape) > 0.1
    ok[2] = False
    ok[2, :1] = True
    for zeroed in (False, True):
        given = np.where(ok, values, np.float32(0)) if zeroed else values
        got = _clipped_std_numpy(given, ok, 4.0, 3, zeroed=zeroed)
        expected = _clipped_std_where(np.where(ok, values, np.float32(0)), ok, 4.0, 3)
        assert np.array_equal(got, expected, equal_nan=True)
    finite_rows = _clipped_std_numpy(values[:4], ok[:4], 4.0, 3)
    assert np.array_equal(finite_rows, _clipped_std_where(
        np.where(ok[:4], values[:4], np.float32(0)), ok[:4], 4.0, 3))
    assert 1.9 < finite_rows[0] < 2.1 and finite_rows[2] == 0 and finite_rows[3] == 0


@pytest.mark.parametrize("noise_scale", NOISE_SCALES)
def test_non_finite_pixels_marked_valid_are_zero(noise_scale):
    """A NaN or an infinity the mask calls valid enters as 0 and moves nothing else beyond its
    cells' neighbourhood (with ``decorrelated``, nothing beyond the panel factor's sampling:
    three pixels fewer in its pairs)."""
    rng = np.random.default_rng(14)
    image = _strong_background(rng, (96, 96))
    poisoned = image.copy()
    poisoned[10, 10], poisoned[50, 60], poisoned[70, 20] = np.nan, np.inf, -np.inf
    z, clean = _z(poisoned, noise_scale=noise_scale), _z(image, noise_scale=noise_scale)
    assert z[10, 10] == z[50, 60] == z[70, 20] == 0 and np.isfinite(z).all()
    far = np.ones(image.shape, bool)
    for y, x in ((10, 10), (50, 60), (70, 20)):
        far[max(0, y - 48):y + 49, max(0, x - 48):x + 49] = False
    if noise_scale == "decorrelated":
        np.testing.assert_allclose(z[far], clean[far], atol=1e-3)
    else:
        np.testing.assert_array_equal(z[far], clean[far])


@pytest.mark.usefixtures("sorting")
def test_nan_median_filter_through_numpy_is_torchs_nanmedian():
    """The cell grid's NaN-aware median filters through numpy against torch's ``nanmedian`` of
    the unfolded windows: the same values (NaN where a window holds none), with NaN and
    infinite cells, ties, a grid of one cell and one of only NaN, for the 3 x 3 and 5 x 5
    windows the maps use."""
    import torch.nn.functional as F

    from peaknet_xtal.model.layers.local_norm import _nan_median_filter

    rng = np.random.default_rng(16)
    grid = torch.from_numpy(rng.normal(100.0, 10.0, (40, 12, 13)).astype(np.float32))
    grid[grid > 112] = float("nan")
    grid[0, 0, :3], grid[1, 2, 3], grid[2] = float("inf"), -float("inf"), grid[2].round()
    for g in (grid, torch.full((3, 4, 5), float("nan")), torch.randn(2, 1, 1)):
        for size in (3, 5):
            r = size // 2
            padded = F.pad(g.unsqueeze(1), (r, r, r, r), value=float("nan"))
            expected = F.unfold(padded, size).nanmedian(dim=1).values.view_as(g)
            assert _same(_nan_median_filter(g, size), expected)



def test_the_quantum_is_the_step_every_count_is_a_multiple_of():
    """The count check's quantum: 1 on a counting detector's frame, with or without a 1 among
    its valid counts, the common step of counts stored at 30 ADU a photon, and 1 ADU for
    whole-number ADU standing on a pedestal, whose smallest value is no photon."""
    counts = np.array([[0, 2, 3], [4, 1, 6]], np.float32)
    ok = np.ones(counts.shape, bool)
    assert exact_counts(counts, ok) == (16, 1.0)
    assert exact_counts(counts * 30, ok) == (480, 30.0)
    ok[1, 1] = False  # the only 1 masked: 2, 3, 4 and 6 are still single photons
    assert exact_counts(counts, ok) == (15, 1.0)
    assert exact_counts(counts * 30, ok) == (450, 30.0)
    assert exact_counts(np.array([[40, 60], [100, 0]], np.float32),
                        np.ones((2, 2), bool)) == (200, 20.0)
    pedestal = np.array([[251, 263], [298, 270]], np.float32)
    assert exact_counts(pedestal, np.ones((2, 2), bool)) == (1082, 1.0)


def test_whole_number_adu_on_an_offset_read_as_they_do_without_it():
    """An integrating detector's whole-number ADU (a CSPAD ASIC, a CCD's raw frames) lifted by
    a constant offset (a stale dark, a bias) are seen by the network as without it: the
    background and noise maps take the offset out, and the dither of exact counts is a fraction
    of one ADU, not of the smallest value (then about half the offset, which drowned a real
    CSPAD ASIC's 10 ADU of noise and lost 14 of its 15 peaks)."""
    rng = np.random.default_rng(26)
    adu = np.rint(rng.normal(0.0, 10.0, (128, 160))).astype(np.float32)
    yy, xx = np.mgrid[:128, :160]
    adu += np.rint(400.0 * np.exp(-((yy - 60) ** 2 + (xx - 70) ** 2) / 4.0)).astype(np.float32)
    for offset in (300.0, 3000.0):
        lifted = adu + offset
        assert lifted.min() > 0 and exact_counts(lifted, np.ones(adu.shape, bool))[1] == 1.0
        z0, z1 = _z(adu, noise_scale="decorrelated"), _z(lifted, noise_scale="decorrelated")
        assert np.sqrt(np.mean((z1 - z0) ** 2)) < 0.1  # a twentieth of the noise's dither
        assert abs(z1[60, 70] - z0[60, 70]) < 0.1 and z0[60, 70] > 3.0


@pytest.mark.parametrize("origin", [(0, 0), (5, 70), (63, 1)])
def test_host_dither_is_the_device_dither_on_any_origin_and_size(origin):
    """The host's dither (block counts summed from float32, blocks gathered row by row into
    place) against the torch one on panels that are and are not whole blocks, anchored
    anywhere, with masked pixels holding other values."""
    from peaknet_xtal.model.layers.local_norm import dither_noise

    rng = np.random.default_rng(17)
    for shape in ((64, 64), (130, 200), (70, 65)):
        counts = rng.poisson(3.0, shape).astype(np.float32)
        ok = rng.random(shape) > 0.1
        counts[~ok] = -1.0
        if origin[0] >= shape[0] or origin[1] >= shape[1]:
            continue
        host = dither_noise(ok, counts, origin)
        device = dither_noise(torch.from_numpy(ok), torch.from_numpy(counts), origin).numpy()
        assert host.shape == counts.shape and host.dtype == np.float32
        np.testing.assert_array_equal(host, device)
        assert np.all(host[:origin[0]] == 0) and np.all(host[:, :origin[1]] == 0)
