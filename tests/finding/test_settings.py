"""finding.settings: the defaults every entry point shares and the one gain resolution."""
from __future__ import annotations

import inspect

import pytest

from peaknet_xtal.finding.settings import DEFAULTS, resolve_gain
from peaknet_xtal.formats.geometry import HC_EV_A, parse_geometry


def test_library_cli_and_engine_start_from_the_same_defaults():
    from peaknet_xtal.cli.peaknet2cxi import DEFAULTS as CLI
    from peaknet_xtal.finding import InferenceEngine, PeakFinder, PeakParams

    finder = inspect.signature(PeakFinder).parameters
    engine = inspect.signature(InferenceEngine).parameters
    for name in ("threshold", "min_snr", "min_height", "rescue_prob", "rescue_height",
                 "faint_support", "batch_size", "model", "device", "precision", "tile_size"):
        assert finder[name].default == getattr(DEFAULTS, name), name
        assert CLI[name] == getattr(DEFAULTS, name), name
    for name in ("batch_size", "tile_size", "tile_overlap", "model", "device", "precision"):
        assert engine[name].default == getattr(DEFAULTS, name), name
    params = PeakParams()
    assert (params.threshold, params.min_snr, params.min_height) == (
        DEFAULTS.threshold, DEFAULTS.min_snr, DEFAULTS.min_height)
    assert (params.rescue_prob, params.rescue_height) == (DEFAULTS.rescue_prob,
                                                           DEFAULTS.rescue_height)
    assert (params.faint_height, params.faint_support) == (DEFAULTS.faint_height,
                                                           DEFAULTS.faint_support)


def test_the_least_tile_size_every_entry_point_allows_is_the_least_the_engine_takes():
    """LIMITS states tile_size's range for peaknet2cxi and the DIALS PHIL; the engine, which
    tiles with the default overlap for them, must take exactly that range."""
    from peaknet_xtal.finding import PeakFinder
    from peaknet_xtal.finding.settings import LIMITS

    least = int(LIMITS["tile_size"]["ge"])
    assert PeakFinder(tile_size=least).engine.tile_size == least
    with pytest.raises(ValueError, match=f"tile_size must be >= {least}"):
        PeakFinder(tile_size=least - 1)


def test_gain_resolution_order(make_geometry_text):
    text = "adu_per_eV = 0.002\n" + make_geometry_text(["p0"], 8, 8, [(0.0, 0.0)],
                                                       photon_energy="8000 eV")
    geometry = parse_geometry(text)
    assert resolve_gain(geometry=geometry) == pytest.approx(16.0)  # adu_per_eV x energy
    assert resolve_gain(geometry=geometry, wavelength_A=HC_EV_A / 9000) == pytest.approx(18.0)
    assert resolve_gain(meta={"adu_per_photon": 5.0}, geometry=geometry) == 5.0
    assert resolve_gain(0.0, meta={"adu_per_photon": 5.0}, geometry=geometry) == 0.0
    assert resolve_gain(meta={"adu_per_photon": 0}) is None  # undeclared
    assert resolve_gain(estimate=lambda: 7.5) == 7.5  # a measurement plugs in last
    assert resolve_gain(meta={"adu_per_photon": 2.0}, estimate=lambda: 7.5) == 2.0


def test_panel_gain_is_the_panels_own_first(make_geometry_text):
    text = make_geometry_text(["p0", "p1"], 8, 8, [(0.0, 0.0), (0.0, 10.0)],
                              adu_per_photon="3", extra="p1/adu_per_photon = 12\n")
    geometry = parse_geometry(text)
    assert resolve_gain(geometry=geometry, panel=1) == 12.0
    assert resolve_gain(geometry=geometry, panel=0) == 3.0


def test_within_refuses_infinity_unless_the_range_reaches_it():
    """``gt=0`` let ``lr: .inf`` and ``--min-snr inf`` through (inf > 0): a meaningless run,
    exit 0.  Only a range bounded by infinity itself (``le=math.inf``: "no limit") takes it."""
    import math

    from peaknet_xtal.finding.settings import range_text, within

    inf = math.inf
    assert not within({"gt": 0}, inf) and not within({"ge": 0}, inf)
    assert not within({"ge": 0}, -inf) and not within({}, inf) and not within({}, math.nan)
    assert within({"gt": 0, "le": inf}, inf) and not within({"gt": 0, "le": inf}, -inf)
    assert within({"ge": -inf}, -inf) and not within({"ge": -inf}, inf)
    assert within({"ge": 0}, 10 ** 400)  # a whole number is finite, however large
    assert within({"ge": 0, "le": 1}, 1.0) and within({"gt": 0}, 1e300)
    assert range_text({"ge": 0}, inf) == "a finite number >= 0"
    assert range_text({}, -inf) == "a finite number" and range_text({"ge": 0}, -1) == ">= 0"


@pytest.mark.parametrize("name", ["adu_per_photon", "min_snr", "min_height", "rescue_height",
                                  "threshold", "rescue_prob"])
def test_every_finding_setting_refuses_infinity_naming_it(name):
    import math

    from peaknet_xtal.finding.settings import LIMITS, check_limits

    assert not any(math.isinf(v) for bounds in LIMITS.values() for v in bounds.values())
    for value in (math.inf, -math.inf):
        with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
            check_limits({name: value})
