"""Detector gain from the data: the photon-transfer slope on simulated frames of known gain and on
the real CSPAD CBFs, and the rules for when an estimate replaces a declared gain."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.finding.gain import (
    UNKNOWN,
    GainEstimate,
    GainResolver,
    choose_gain,
    estimate_gain,
    is_placeholder,
)
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.sim import SimConfig, simulate_frame
from peaknet_xtal.types import Frame

EPIX = "crystfel_geometry/om_lcls_mfx_epix10k2M.geom"
CSPAD = "cspad_thermolysin_stills/idx-20130301060858401.cbf"


@pytest.fixture(scope="module")
def epix(real_data):
    return read_geometry(real_data / EPIX)


def sim(geometry, gain: float, background: float, hit: float = 1.0, seed: int = 1) -> Frame:
    config = SimConfig(adu_per_photon=gain, air_photons=background, water_photons=background,
                       kapton=True, hit_probability=hit)
    frame, _ = simulate_frame(geometry, seed, config)
    return frame


@pytest.mark.parametrize(("gain", "background", "hit"),
                         [(1.0, 3.0, 1.0), (7.0, 0.15, 1.0), (30.0, 1.0, 0.0), (50.0, 0.15, 0.0)])
def test_gain_of_simulated_frames_within_ten_percent(epix, gain, background, hit):
    frame = sim(epix, gain, background, hit)
    estimate = estimate_gain(frame.panels, frame.masks)
    assert estimate.reliable
    assert estimate.gain == pytest.approx(gain, rel=0.10)


def test_pedestal_offsets_and_spots_do_not_move_the_slope(epix):
    """Large per-panel offsets (tens of photons) are a fixed effect; a plain variance/mean ratio
    would be pulled far off by them."""
    frame = sim(epix, 10.0, 1.0)
    rng = np.random.default_rng(3)
    shifted = [p + rng.uniform(-200, 400) for p in frame.panels]
    base = estimate_gain(frame.panels, frame.masks).gain
    assert estimate_gain(shifted, frame.masks).gain == pytest.approx(base, rel=1e-6)
    ratio = np.median([np.var(p[m]) / np.mean(p[m]) for p, m in
                       zip(shifted, frame.masks, strict=True)])
    assert abs(ratio - 10.0) > 5.0


def test_flat_frame_without_photons_claims_nothing():
    """Read noise alone: no level spread, so no slope worth trusting."""
    rng = np.random.default_rng(0)
    panels = [rng.normal(100.0, 3.0, (256, 256)) for _ in range(4)]
    estimate = estimate_gain(panels)
    assert not estimate.reliable
    assert choose_gain(None, estimate)[0] is None
    assert choose_gain(1.0, estimate)[0] == 1.0
    assert estimate_gain([np.zeros((8, 8))]) is UNKNOWN


def sparse_panels(photons: float, gain: float, read_noise: float, seed: int,
                  shapes: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
    """A blank detector's background: a few hundredths to tenths of a photon a pixel with a
    gentle gradient, read noise above the shot noise, a pedestal offset per panel (64 panels
    of 512 x 256 pixels unless ``shapes`` says otherwise)."""
    rng = np.random.default_rng(seed)
    panels = []
    for shape in shapes or [(512, 256)] * 64:
        x = np.arange(shape[1]) / shape[1]
        level = photons * (0.2 + 0.8 * x)[None, :] * rng.uniform(0.5, 1.0) * np.ones((shape[0], 1))
        panels.append(rng.poisson(level) * gain + rng.normal(0.0, read_noise, level.shape)
                      + rng.normal(0.0, 5.0))
    return panels


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_nearly_flat_sparse_background_is_never_confidently_wrong(seed):
    """At 0.05 photons a pixel the groups' level spread is mostly the sampling noise of their
    means: the plain slope came out at a fifth of the gain while claiming 12 % (errors in
    variables).  Now the estimate is either right or not called reliable, and at 0.2 photons a
    pixel, where the spread is real, it is right."""
    gain = 8.0
    flat = estimate_gain(sparse_panels(0.05, gain, 3.6, seed))
    assert not flat.reliable or flat.gain == pytest.approx(gain, rel=0.1)
    assert flat.lever < 0.9  # the sampling noise of the group means is measured, not ignored
    sparse = estimate_gain(sparse_panels(0.2, gain, 3.6, seed))
    assert sparse.reliable
    assert sparse.gain == pytest.approx(gain, rel=0.05)


def test_masked_blocks_are_left_out(epix):
    frame = sim(epix, 10.0, 1.0)
    spoiled = [p.copy() for p in frame.panels]
    masks = [m.copy() for m in frame.masks]
    spoiled[0][:64, :64] = 1e6  # garbage, but masked
    masks[0][:64, :64] = False
    assert estimate_gain(spoiled, masks).gain == pytest.approx(
        estimate_gain(frame.panels, frame.masks).gain, rel=0.05)


def measured(gain: float) -> GainEstimate:
    return GainEstimate(gain=gain, intercept=0.0, relative_error=0.01, n_blocks=1000,
                        mean_range=(0.0, 100.0))


@pytest.mark.parametrize(("declared", "estimate", "used"), [
    (None, 30.0, 30.0),        # nothing declared: the estimate
    (1.0, 30.0, 30.0),         # nominal 1 on an integrating detector: placeholder
    (9000.0, 30.0, 30.0),      # adu_per_eV = 1 at 9 keV: placeholder
    (1.0, 1.3, 1.0),           # placeholder but the data agree: kept
    (25.0, 30.0, 25.0),        # a real declared gain the data agree with
    (5.0, 30.0, 5.0),          # a real declared gain is never overruled, only logged
])
def test_when_an_estimate_replaces_the_declared_gain(declared, estimate, used):
    assert choose_gain(declared, measured(estimate))[0] == pytest.approx(used)


def test_placeholders():
    assert is_placeholder(1.0) and is_placeholder(12000.0)
    assert not is_placeholder(30.0) and not is_placeholder(0.5)


def test_resolver_pools_the_first_frames_then_stops_estimating(epix, monkeypatch):
    frames = [sim(epix, 20.0, 1.0, seed=s) for s in range(3)]
    resolver = GainResolver(frames=2)
    gains = [resolver(None, f.panels, f.masks) for f in frames]
    assert all(g == pytest.approx(20.0, rel=0.1) for g in gains)
    assert gains[2] == gains[1]  # settled after two frames
    calls = []
    monkeypatch.setattr("peaknet_xtal.finding.gain.estimate_gain",
                        lambda *a, **k: calls.append(1) or UNKNOWN)
    assert resolver(None, frames[0].panels) == gains[1] and not calls
    assert resolver(25.0, frames[0].panels) == 25.0  # a real declared gain wins


def test_resolver_looks_past_blanks_that_show_no_gain(epix, monkeypatch):
    """A run opening with flat blanks (no reliable estimate) still gets its gain from the first
    frames that show one, and stops looking after ``max_frames``."""
    good = sim(epix, 20.0, 1.0)
    flat = sparse_panels(0.05, 8.0, 3.6, 1, [p.shape for p in good.panels])
    assert not estimate_gain(flat).reliable
    resolver = GainResolver(frames=2, max_frames=8)
    assert all(resolver(None, flat) is None for _ in range(6))
    assert resolver(None, good.panels, good.masks) == pytest.approx(20.0, rel=0.1)
    calls = []
    monkeypatch.setattr("peaknet_xtal.finding.gain.estimate_gain",
                        lambda *a, **k: calls.append(1) or UNKNOWN)
    resolver(None, good.panels, good.masks)  # the eighth frame: still one estimate short
    assert resolver(None, good.panels, good.masks) == pytest.approx(20.0, rel=0.1)
    assert len(calls) == 1  # none after max_frames


def test_engine_uses_the_estimate_when_the_frame_declares_none(epix):
    frame = sim(epix, 30.0, 1.0)
    bare = Frame(panels=frame.panels, masks=frame.masks, geometry=None, meta={})
    engine = InferenceEngine(predictor=lambda panels, masks: [np.zeros_like(p) for p in panels])
    assert engine.params_for(bare).adu_per_photon == pytest.approx(30.0, rel=0.1)
    explicit = InferenceEngine(adu_per_photon=0.0,
                               predictor=lambda panels, masks: [np.zeros_like(p) for p in panels])
    assert explicit.params_for(bare).adu_per_photon == 0.0


@pytest.mark.dials
def test_real_cspad_cbf_gain_near_thirty(real_data, dials_env):
    """Nominal gain 1 in the CBF, about 30 ADU per photon in truth (dials.estimate_gain says 4)."""
    import dxtbx

    image = dxtbx.load(str(real_data / CSPAD))
    panels = [np.asarray(p.as_numpy_array(), dtype=float) for p in image.get_raw_data()]
    estimate = estimate_gain(panels)
    assert estimate.reliable
    assert 20.0 < estimate.gain < 40.0
    assert choose_gain(1.0, estimate)[0] == estimate.gain


def test_a_panel_without_one_good_block_gives_no_statistics_and_no_estimate():
    """An all-NaN or fully masked frame has no background to measure: nothing, not an error."""
    from peaknet_xtal.finding.gain import block_statistics, estimate_gain

    panel = np.full((64, 64), np.nan, np.float32)
    assert all(len(column) == 0 for column in block_statistics(panel))
    masked = np.ones((64, 64), np.float32)
    assert all(len(c) == 0 for c in block_statistics(masked, np.zeros((64, 64), bool)))
    assert not estimate_gain([panel]).reliable


def test_another_detector_gets_its_own_gain_not_the_last_ones():
    """One resolver (one engine, one PeakFinder) handed frames of two detectors: the second
    detector's gain is measured on its own frames, never pooled with the first's."""
    from peaknet_xtal.finding.gain import GainResolver

    rng = np.random.default_rng(7)

    def frame(shape: tuple[int, int], gain: float) -> list[np.ndarray]:
        level = np.linspace(1.0, 20.0, shape[1])[None, :] * np.ones(shape)  # a smooth gradient
        photons = rng.poisson(level).astype(np.float32)
        return [photons * np.float32(gain) + rng.normal(0, 0.3 * gain, shape).astype(np.float32)]

    resolver = GainResolver()
    first = [resolver(None, frame((256, 256), 30.0)) for _ in range(3)]
    second = [resolver(None, frame((192, 320), 1.0)) for _ in range(3)]
    assert all(g is not None and 20 < g < 40 for g in first), first
    assert all(g is not None and 0.6 < g < 1.5 for g in second), second


@pytest.mark.parametrize("seed", range(6))
def test_groups_of_blocks_are_the_per_group_definition(seed):
    """All groups of a panel at once (one sort, bincount sums) give what each group alone
    gives by its definition: split by level in array_split's sizes, blocks outside 1.5
    interquartile ranges of ``np.percentile``'s quartiles dropped, groups of fewer than 3
    left out; with ties, outliers and groups of 8 to several hundred blocks."""
    from peaknet_xtal.finding.gain import _group_points

    rng = np.random.default_rng(seed)
    n = int(rng.integers(16, 5000))
    count = min(16, n // 8)
    key, mean, third = rng.normal(size=n), rng.normal(100, 5, n), rng.normal(size=n)
    var = rng.gamma(2.0, size=n)
    var[rng.random(n) < 0.05] *= 50  # blocks holding spots
    if seed % 2:
        var = np.round(var, 1)  # ties at the quartiles
    expected = []
    for members in np.array_split(np.argsort(key, kind="stable"), count):
        v = var[members]
        q1, q3 = np.percentile(v, [25, 75])
        keep = (v >= q1 - 1.5 * (q3 - q1)) & (v <= q3 + 1.5 * (q3 - q1))
        if keep.sum() < 3:
            continue
        pixels = 128 * int(keep.sum())
        expected.append((mean[members][keep].mean(), v[keep].mean(), float(keep.sum()),
                         v[keep].mean() / pixels, third[members][keep].mean() / pixels))
    got = _group_points(key, mean, var, third, count, 128)
    assert len(got) == len(expected) >= 2
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("q", [0.25, 0.75, 0.5, 0.1])
def test_quantiles_of_sorted_runs_are_numpys_to_the_last_bit(q):
    from peaknet_xtal.finding.gain import _sorted_quantile

    rng = np.random.default_rng(7)
    sizes = rng.integers(2, 300, 200)
    runs = [np.sort(np.round(rng.gamma(2.0, size=n), int(rng.integers(0, 4)))) for n in sizes]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    got = _sorted_quantile(np.concatenate(runs), starts, sizes, q)
    assert np.array_equal(got, [np.percentile(run, 100 * q) for run in runs])


def chip_panels(gain: float, photons: float, shape: tuple[int, int], chip: int, panels: int,
                seed: int, offset_photons: float = 0.2) -> list[np.ndarray]:
    """Panels made of ``chip`` x ``chip`` chips, each with its own pedestal offset (Gaussian,
    ``offset_photons`` photons: the residual of a JUNGFRAU or AGIPD pedestal map), a smooth
    background of ``photons`` a pixel (a gradient and a ripple, as air and water scatter give),
    Poisson counts times ``gain`` and read noise of 0.15 photon."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    out = []
    for _ in range(panels):
        level = photons * (0.4 + 0.6 * (xx / shape[1] + 0.3 * np.sin(yy / 40.0)) ** 2)
        offsets = rng.normal(0.0, offset_photons * gain, (shape[0] // chip, shape[1] // chip))
        out.append(rng.poisson(level) * gain + rng.normal(0.0, 0.15 * gain, shape)
                   + np.kron(offsets, np.ones((chip, chip))))
    return out


@pytest.mark.parametrize(("shape", "chip", "panels", "gain"), [
    ((1024, 1024), 256, 2, 12.4),  # JUNGFRAU chips (a Jungfraujoch file is one big panel)
    ((512, 128), 64, 16, 69.75),   # AGIPD modules of 8 x 2 ASICs of 64 x 64
])
@pytest.mark.parametrize("seed", [1, 2])
def test_pedestal_offsets_per_chip_inside_a_panel_do_not_pull_the_gain_down(shape, chip, panels,
                                                                             gain, seed):
    """Chip offsets of 0.2 photon inside a panel add level spread with no variance: the fit with
    one offset per panel came out at a tenth to a half of the gain (a Jungfraujoch 4M file: 1.3
    for 12.4; AGIPD: 10 for 70) or unreliable.  The fixed effect per 64-px region takes them
    out: the estimate is reliable and within four of its own standard errors (plus 3 % for the
    bias of the grouping on a ripple this steep) of the truth."""
    estimate = estimate_gain(chip_panels(gain, 1.0, shape, chip, panels, seed))
    assert estimate.reliable
    tolerance = 4 * estimate.relative_error + 0.03
    assert estimate.gain == pytest.approx(gain, rel=tolerance)
    assert estimate.within_regions and "within 64-px regions" in estimate.describe()


def test_offsets_constant_over_each_region_move_the_per_region_fit_not_at_all():
    """The per-region fit's fixed effect: any offsets constant over each 64 x 64 region (tens of
    photons here) change none of its points (the same blocks kept, grouped and averaged)."""
    from peaknet_xtal.finding.gain import _block_table, _region_points

    panel = chip_panels(10.0, 1.0, (256, 256), 64, 1, 5, offset_photons=0.0)[0]
    rng = np.random.default_rng(6)
    shifted = panel + np.kron(rng.uniform(-200, 400, (4, 4)), np.ones((64, 64)))

    def points(image: np.ndarray) -> np.ndarray:
        key, mean, var, _, third, row, col, key_var = _block_table(image, None, 16)
        return np.array(_region_points(key, mean, var, third, (row // 4) * 4 + col // 4, 16, 128,
                                       key_var))

    np.testing.assert_allclose(points(shifted), points(panel), rtol=1e-6, atol=1e-6)


def test_the_per_region_fit_takes_no_more_groups_than_its_blocks_fill():
    """The panel's group count is set by all its flat blocks; the per-region fit sees only the
    uncorrelated ones, sometimes a few dozen.  Asked for the panel's 16 groups with 20 blocks it
    makes at most 20 // 8 (an IndexError from a group of one block, on a simulated ePix10k2M
    frame, stopped the blank benchmark)."""
    from peaknet_xtal.finding.gain import MIN_GROUP, _block_table, _region_points

    rng = np.random.default_rng(12)
    panel = rng.poisson(np.full((80, 64), 4.0)) * 10.0 + rng.normal(0, 1.5, (80, 64))
    key, mean, var, _, third, row, col, key_var = _block_table(panel, None, 16)
    assert len(key) == 20
    found = _region_points(key, mean, var, third, (row // 4) * 2 + col // 4, 16, 128, key_var)
    assert 0 < len(found) <= len(key) // MIN_GROUP
    assert _region_points(key[:10], mean[:10], var[:10], third[:10], row[:10] // 4, 16, 128,
                          key_var[:10]) == []


def test_the_per_region_noise_accounting_leaves_no_lever_where_regions_are_flat() -> None:
    """Blocks taken about their region's average carry sampling noise of their own, less what
    the average took (the exact covariances in ``_region_points``).  With no level spread inside
    any region (flat regions at different levels, offsets besides) all the group points' spread
    is that noise: the lever (real share) must come out near 0, where leaving the noise out
    gives 1.  Its sampling spread over 16 panels x 16 groups (about 240 degrees of freedom) is
    about sqrt(2 / 240) = 0.09: the bound 0.3 is three of those."""
    from peaknet_xtal.finding.gain import _block_table, _fit, _region_points

    rng = np.random.default_rng(11)
    points: list[tuple[float, ...]] = []
    owner: list[int] = []
    for i in range(16):
        level = np.kron(rng.uniform(0.5, 3.0, (8, 2)), np.ones((64, 64)))
        panel = rng.poisson(level) * 10.0 + rng.normal(0, 1.5, level.shape)
        key, mean, var, _, third, row, col, key_var = _block_table(panel, None, 16)
        found = _region_points(key, mean, var, third, (row // 4) * 2 + col // 4, 16, 128, key_var)
        points.extend(found)
        owner.extend([i] * len(found))
    fit = _fit(points, owner, 0, centred=True)
    assert abs(fit.lever) < 0.3


def test_offset_free_frames_keep_the_per_panel_fit(epix):
    """Without offsets inside panels the per-panel fit (the more precise) stands: on the
    simulated hits and blanks the per-region one is not taken, so their numbers are as before."""
    for hit, background in [(1.0, 1.0), (1.0, 3.0), (0.0, 0.15)]:
        frame = sim(epix, 10.0, background, hit)
        estimate = estimate_gain(frame.panels, frame.masks)
        assert not estimate.within_regions


def test_engine_measures_the_gain_of_one_big_panel_with_chip_offsets():
    """What peaknet2cxi does with a Jungfraujoch file (one panel of many chips) declaring the
    placeholder gain 1: the engine's gain for the frame is the measured one, not 1 (before: the
    background 'did not show one' and 1 was kept, so blank frames turned into hits)."""
    panels = chip_panels(12.4, 1.0, (1024, 1024), 256, 1, 3)
    masks = [np.ones(p.shape, bool) for p in panels]
    frame = Frame(panels=panels, masks=masks, geometry=None, meta={"adu_per_photon": 1.0})
    engine = InferenceEngine(predictor=lambda panels, masks: [np.zeros_like(p) for p in panels])
    assert engine.params_for(frame).adu_per_photon == pytest.approx(12.4, rel=0.1)


@pytest.mark.parametrize("declared", [1.0, None])
def test_a_kept_placeholder_that_the_background_does_not_check_is_a_warning(caplog, declared):
    """A placeholder gain 1 kept, or no gain at all, because no frame so far shows the gain is
    logged as a warning (on an integrating detector every peak SNR is then far too high: with no
    gain, a real CSPAD still with a saturated plateau got 304 peaks for 237, said at info level
    only); a measured gain, info."""
    rng = np.random.default_rng(0)
    flat = [rng.normal(100.0, 3.0, (512, 512)) for _ in range(4)]
    resolver = GainResolver()
    with caplog.at_level("INFO", logger="peaknet_xtal.finding.gain"):
        assert resolver(declared, flat) == declared
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "--adu-per-photon" in warned[0].getMessage()
    caplog.clear()
    good = chip_panels(12.4, 1.0, (512, 512), 512, 4, 1, offset_photons=0.0)
    with caplog.at_level("INFO", logger="peaknet_xtal.finding.gain"):
        assert resolver(declared, good) == pytest.approx(12.4, rel=0.1)
    assert [r.levelname for r in caplog.records] == ["INFO"]


def healthy_panels(seed: int) -> list[np.ndarray]:
    """16 panels of 256 x 256 pixels at 12.4 ADU per photon, a smooth background of about a
    photon a pixel, no offsets inside the panels."""
    return chip_panels(12.4, 1.0, (256, 256), 256, 16, seed, offset_photons=0.0)


def agrees(estimate: GainEstimate, reference: GainEstimate) -> bool:
    """The estimate from a subset of a frame's blocks (some panels or blocks left out) agrees
    with the whole frame's within three of its own standard errors (the difference of nested
    estimates scatters by less than the subset's standard error)."""
    return bool(estimate.reliable and abs(estimate.gain - reference.gain)
                <= 3 * estimate.relative_error * estimate.gain)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_panel_at_ten_times_the_gain_is_left_out_not_followed(seed):
    """One panel of 16 at ten times the gain (a gain mode or calibration applied wrongly) has a
    hundred times the others' weight in the shared slope: the frame read about 110 ADU per
    photon for 12.4 (two CSPAD ASICs of 64: 291 for 28, and the healthy panels lost four peaks
    of five).  Its own slope, far above the median panel's, leaves it out: the frame measures the
    other panels' gain, and says which panel and what it showed."""
    clean = estimate_gain(healthy_panels(seed))
    faulty = [p * 10 if i == 5 else p for i, p in enumerate(healthy_panels(seed))]
    estimate = estimate_gain(faulty)
    assert agrees(estimate, clean), (estimate, clean)
    assert [panel for panel, _ in estimate.disagreeing] == [5]
    assert estimate.disagreeing[0][1] == pytest.approx(10 * clean.gain, rel=0.2)


def test_a_faulty_panel_with_no_slope_of_its_own_is_left_out_by_its_noise():
    """A faulty panel at ten times the gain whose background is flat (a dim ASIC: no level
    spread, so no slope of its own to compare) still swamps the fit with its noise: this frame
    read 28 for 12.4, +- 18 % (the simulated ePix10k2M module: 20.1 +- 13 % for 30, called
    reliable).  Without it the fit's standard error falls many times, so it is left out, and the
    frame is as precise as its healthy panels make it."""
    panels = healthy_panels(1)
    clean = estimate_gain(panels)
    rng = np.random.default_rng(5)
    panels[7] = (rng.poisson(0.3, (256, 256)) * 12.4 + rng.normal(0, 1.9, (256, 256))) * 10
    estimate = estimate_gain(panels)
    assert agrees(estimate, clean), (estimate, clean)
    # one panel of 16 fewer: its standard error grows by about 1/16, not the 20 times it had
    assert estimate.relative_error < 1.5 * clean.relative_error
    assert estimate.noisy == (7,) and not estimate.disagreeing


def test_the_resolver_warns_once_naming_the_left_out_panels(caplog):
    """The run's gain is the healthy panels'; the warning names the panel (by the geometry's
    name where the caller gives names, else by its index) once a run, not every frame."""
    names = [f"q{i}" for i in range(16)]
    resolver = GainResolver(frames=2)
    with caplog.at_level("INFO", logger="peaknet_xtal.finding.gain"):
        for seed in (1, 2):
            faulty = [p * 10 if i == 5 else p for i, p in enumerate(healthy_panels(seed))]
            gain = resolver(None, faulty, None, names)
    assert gain == pytest.approx(12.4, rel=0.05)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "q5 show" in warned[0] and "q4" not in warned[0]
    caplog.clear()
    resolver = GainResolver()
    with caplog.at_level("WARNING", logger="peaknet_xtal.finding.gain"):
        for seed in (1, 2):
            resolver(None, [p * 10 if i == 5 else p for i, p in enumerate(healthy_panels(seed))])
    assert "panel(s) 5 (counted from 0)" in caplog.records[0].getMessage()


def test_a_panel_left_out_of_one_frame_only_is_not_named(caplog):
    """A wrong gain correction stays frame after frame; a zinger or streak the block filters
    missed makes one frame's panel read high: left out of that frame's fit, but not called a
    calibration error."""
    resolver = GainResolver(frames=3)
    with caplog.at_level("WARNING", logger="peaknet_xtal.finding.gain"):
        for seed in (1, 2, 3):
            panels = healthy_panels(seed)
            if seed == 1:
                panels[5] = panels[5] * 10
            resolver(None, panels)
    assert not [r for r in caplog.records if "left out" in r.getMessage()]
    assert resolver.estimate == pytest.approx(12.4, rel=0.05)


def test_blocks_of_zero_counts_stay_blocks_of_one_other_value_go():
    """A block of one value has no noise: a saturated plateau is no background and is left
    out; a block of 0 counts is the background of a sparse photon-counting frame and stays
    (leaving those out too took a simulated Eiger 16M blank from 0.98 ADU per photon to 0.094,
    called reliable)."""
    from peaknet_xtal.finding.gain import block_statistics

    rng = np.random.default_rng(0)
    panel = rng.poisson(2.0, (64, 64)).astype(np.float64)
    panel[:16, :16] = 0.0  # one block of zero counts
    panel[16:32, :16] = 16383.0  # one saturated block
    mean = block_statistics(panel)[1]
    assert len(mean) == 15 and (mean == 0).sum() == 1 and not (mean > 1000).any()


def test_panels_are_named_by_the_geometry_that_has_one_per_panel(tmp_path):
    """The engine names left-out panels by the frame's geometry (``p2a1``), but only where the
    geometry's panels are the frame's; else the warning counts them."""
    from peaknet_xtal.finding.gain import panel_names

    path = tmp_path / "g256.geom"
    path.write_text(G256)
    geometry = read_geometry(path)
    assert panel_names(geometry, 1) == ["p0"]
    assert panel_names(geometry, 2) is None and panel_names(None, 1) is None


@pytest.mark.parametrize("value", [16383.0, 65535.0])
def test_a_saturated_plateau_does_not_stop_the_measurement(value):
    """A 50 x 50 pixel plateau at one value (saturation, in float data) made blocks with a huge
    level and no variance: the line went flat and the frame showed no gain (a real CSPAD still
    then got 304 peaks for 237).  Blocks of one value have no noise and are left out (the
    plateau's edges, blocks half at the plateau, are left out by their correlated pixels), so
    the frame measures what it does without the plateau."""
    panels = healthy_panels(1)
    clean = estimate_gain(panels)
    panels[0][60:110, 60:110] = value  # not on the 16-px block grid
    estimate = estimate_gain(panels)
    assert agrees(estimate, clean), (estimate, clean)


G256 = """photon_energy = 9000 eV
clen = 0.06 m
res = 10000
adu_per_photon = 12.4
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
p0/min_fs = 0
p0/max_fs = 255
p0/min_ss = 0
p0/max_ss = 255
p0/fs = +1.0x +0.0y
p0/ss = +0.0x +1.0y
p0/corner_x = -128.0
p0/corner_y = -128.0
"""


@pytest.mark.parametrize("background", [0.1, 0.2])
def test_spots_of_a_low_background_hit_do_not_make_the_per_region_gain(tmp_path, background):
    """A dense hit (simulated, 0.1-0.2 photon a pixel of background, 256 x 256 px) with offsets
    of +-0.2 photon per 64-px region, true gain 12.4: the per-panel fit is not reliable (the
    offsets), and the per-region fit's level spread came from spot wings that the per-panel
    correlation filter, relative to the panel's median block (itself a spot's), let through: 19.5
    and 25.6 times the gain, called reliable (a verification run: one such frame set its run's
    gain at 2.7 times).  Now the per-region fit takes only blocks whose pixels correlate no more
    than independent noise does: the estimate is within four of its standard errors plus the
    15 % that faint spots add on hits, or it is not reliable; never twice the gain."""
    path = tmp_path / "g256.geom"
    path.write_text(G256)
    config = SimConfig(adu_per_photon=12.4, air_photons=background, water_photons=background,
                       hit_probability=1.0, scattering_efficiency=1e-9)
    frame, _ = simulate_frame(read_geometry(path), 1, config)
    rng = np.random.default_rng(101)
    offsets = np.kron(rng.choice([-1.0, 1.0], (4, 4)) * 0.2 * 12.4, np.ones((64, 64)))
    estimate = estimate_gain([np.asarray(frame.panels[0], float) + offsets], frame.masks)
    assert estimate.gain < 2 * 12.4 or not estimate.reliable
    if estimate.reliable:
        tolerance = 4 * estimate.relative_error + 0.15
        assert estimate.gain == pytest.approx(12.4, rel=tolerance)
