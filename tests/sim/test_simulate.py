"""Physics of the simulator: checks that fail if the diffraction geometry or scaling is wrong."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.sim import PRESET_CELLS, SimConfig, simulate_frame
from peaknet_xtal.sim.crystal import Cell, absent, excited_reflections, random_rotation
from peaknet_xtal.sim.noise import poisson_frame


@pytest.fixture(scope="module")
def cspad(real_data):
    return read_geometry(real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom")


@pytest.fixture(scope="module")
def lysozyme_hit(cspad):
    return simulate_frame(cspad, 11, SimConfig(cell="lysozyme"))


def test_same_seed_same_frame_and_other_seed_differs(cspad):
    cfg = SimConfig(cell="thermolysin")
    f1, t1 = simulate_frame(cspad, 3, cfg)
    f2, t2 = simulate_frame(cspad, 3, cfg)
    f3, _ = simulate_frame(cspad, 4, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(f1.panels, f2.panels, strict=False))
    # numpy's SIMD exp/tan round in the last bit depending on memory alignment, so float truth
    # is compared to 1e-12; pixels and integer truth are identical.
    for name in t1.reflections.dtype.names:
        np.testing.assert_allclose(t1.reflections[name], t2.reflections[name], rtol=1e-12)
    assert not all(np.array_equal(a, b) for a, b in zip(f1.panels, f3.panels, strict=False))
    assert f1.event == "//3" and f1.panels[0].dtype == np.float32 and f1.masks[0].dtype == bool


def test_every_reflection_satisfies_ewald_within_spread(lysozyme_hit):
    frame, truth = lysozyme_hit
    refl = truth.reflections
    assert len(refl) > 100 and refl["strong"].sum() > 20
    k0 = 1 / truth.wavelength_A
    A = truth.crystals[0].A
    q = np.stack([refl["h"], refl["k"], refl["l"]], axis=1) @ A.T
    eps = np.linalg.norm(q + [0, 0, k0], axis=1) - k0
    np.testing.assert_allclose(eps, refl["excitation_error"], atol=1e-12)
    assert np.all(np.abs(eps) <= 3.0 * refl["sigma_excitation"] + 1e-12)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), refl["one_over_d"], rtol=1e-12)


def test_detector_position_gives_back_one_over_d(cspad, lysozyme_hit):
    frame, truth = lysozyme_hit
    refl = truth.reflections
    # Geometry's own conversion (independent of the simulator's ray casting) at the same distance.
    x, y, z = cspad.panel_to_lab(refl["panel"], refl["fs"], refl["ss"],
                                 clen_m=frame.meta["clen_m"])
    one_over_d = cspad.lab_to_one_over_d(x, y, z, wavelength_A=truth.wavelength_A)
    # A partial reflection sits off the sphere by eps; its spot gives 1/d within ~|eps|.
    assert np.all(np.abs(one_over_d - refl["one_over_d"]) <= np.abs(refl["excitation_error"])
                  + 1e-4)


def test_systematic_absences_respected():
    cell = PRESET_CELLS["insulin_cubic"]  # body centred
    A = random_rotation(np.random.default_rng(0)) @ cell.reciprocal_basis()
    hkl = excited_reflections(A, "I", 1.3, 0.6, 0.01)
    assert len(hkl) > 50
    assert np.all((hkl.sum(axis=1) % 2) == 0)
    assert absent(np.array([1]), np.array([0]), np.array([0]), "F")[0]
    assert not absent(np.array([2]), np.array([2]), np.array([0]), "F")[0]
    assert absent(np.array([1]), np.array([0]), np.array([0]), "H")[0]  # -h+k+l = -1


def test_shell_enumeration_matches_brute_force():
    cell = Cell(40, 50, 60, 80, 95, 105, "triclinic", "P")
    A = random_rotation(np.random.default_rng(5)) @ cell.reciprocal_basis()
    lam, q_max, tol = 1.0, 0.5, 0.004
    fast = {tuple(r) for r in excited_reflections(A, "P", lam, q_max, tol)}
    g = np.arange(-31, 32)
    hkl = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    q = hkl @ A.T
    eps = np.linalg.norm(q + [0, 0, 1 / lam], axis=1) - 1 / lam
    keep = (np.abs(eps) <= tol) & (np.linalg.norm(q, axis=1) <= q_max) & np.any(hkl != 0, axis=1)
    assert fast == {tuple(r) for r in hkl[keep]}


def test_counts_scale_with_incident_photons(cspad):
    base = SimConfig(cell="lysozyme", read_noise=0.0, pedestal_sigma=0.0, dead_fraction=0.0,
                     hot_fraction=0.0)
    low_f, low = simulate_frame(cspad, 21, base)
    high_f, high = simulate_frame(cspad, 21, dataclasses.replace(base, incident_photons=4e12))
    np.testing.assert_allclose(high.reflections["photons"], 4 * low.reflections["photons"],
                               rtol=1e-9)
    ratio = sum(p.sum() for p in high_f.panels) / sum(p.sum() for p in low_f.panels)
    assert 3.9 < ratio < 4.1
    assert high.reflections["strong"].sum() > low.reflections["strong"].sum()


def test_blank_frame_has_no_reflections_and_adu_has_negatives(cspad):
    frame, truth = simulate_frame(cspad, 2, SimConfig(hit_probability=0.0))
    assert not truth.hit and len(truth.reflections) == 0 and not truth.crystals
    assert not any(m.any() for m in truth.peak_masks)
    values = np.concatenate([p.ravel() for p in frame.panels])
    assert (values < 0).any()  # pedestal residuals and read noise go below zero


def test_peak_masks_cover_strong_spot_maxima(lysozyme_hit):
    frame, truth = lysozyme_hit
    strong = truth.strong
    masks = truth.peak_masks
    covered = [masks[p][int(round(s)), int(round(f))]
               for p, f, s in zip(strong["panel"], strong["fs"], strong["ss"], strict=False)]
    assert np.mean(covered) > 0.95
    total = sum(m.sum() for m in masks)
    assert len(strong) <= total < 60 * len(strong)
    # Spots are really there: mean ADU in the masks well above the frame's median.
    inside = np.concatenate([p[m] for p, m in zip(frame.panels, masks, strict=False)])
    assert np.median(inside) > np.median(np.concatenate([p.ravel() for p in frame.panels])) + 2


def test_dead_and_hot_pixels_are_masked_and_constant_over_frames(cspad):
    cfg = SimConfig(dead_fraction=1e-3, hot_fraction=1e-4, hit_probability=0.0)
    f1, t1 = simulate_frame(cspad, 1, cfg)
    f2, _ = simulate_frame(cspad, 2, cfg)
    bad1 = np.concatenate([~m.ravel() for m in f1.masks])
    assert np.array_equal(bad1, np.concatenate([~m.ravel() for m in f2.masks]))
    values = np.concatenate([p.ravel() for p in f1.panels])
    assert (values[bad1] == 0).sum() > 0.5 * bad1.sum() * 0.9
    assert (values[bad1] == np.float32(cfg.hot_value * t1.adu_per_photon)).sum() > 0


def test_gain_is_the_one_every_reader_resolves(cspad):
    """No gain in the config: the geometry's ``adu_per_eV`` at the beam's photon energy (what
    peaknet2cxi, the DIALS format and the Python API take from the same file), in the pixels too.
    """
    from peaknet_xtal.finding.settings import resolve_gain
    from peaknet_xtal.formats.geometry import HC_EV_A

    assert cspad.adu_per_photon is None and cspad.adu_per_eV
    cfg = SimConfig(hit_probability=0.0, read_noise=0.0, pedestal_sigma=0.0, dead_fraction=0.0,
                    hot_fraction=0.0, wavelength_A=1.3)
    frame, truth = simulate_frame(cspad, 3, cfg)
    expected = cspad.adu_per_eV * HC_EV_A / 1.3
    assert truth.adu_per_photon == pytest.approx(expected)
    assert resolve_gain(geometry=cspad, wavelength_A=1.3) == pytest.approx(expected)
    values = np.concatenate([p.ravel() for p in frame.panels])
    counts = values[values > 0] / truth.adu_per_photon  # whole photons, read noise off
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
    stated = dataclasses.replace(cfg, adu_per_photon=2.0)
    assert simulate_frame(cspad, 3, stated)[1].adu_per_photon == 2.0


def test_multi_crystal_hit_has_reflections_of_each(cspad):
    frame, truth = simulate_frame(cspad, 8, SimConfig(cell="thermolysin", n_crystals=2))
    assert len(truth.crystals) == 2
    assert set(np.unique(truth.reflections["crystal"])) == {0, 1}


def test_poisson_frame_is_poisson():
    rng = np.random.default_rng(0)
    for lam in (0.05, 0.7, 3.0, 40.0):
        x = poisson_frame(rng, np.full(200_000, lam, np.float32))
        assert abs(x.mean() - lam) < 5 * np.sqrt(lam / 2e5)
        assert abs(x.var() / lam - 1) < 0.03
        assert np.all(x == np.round(x)) and x.min() >= 0


@pytest.mark.parametrize("name", [
    "om_lcls_mfx_epix10k2M", "om_lcls_rayonix", "extrafoam_agipd_mar18_v11",
    "psgeom_jungfrau-1M-pan", "psgeom_cspad-2x2-approx1",
    pytest.param("crystfel_doc_pilatus", marks=pytest.mark.slow),
    pytest.param("crystfel_doc_jf-swissfel-16M", marks=pytest.mark.slow)])
def test_other_detectors_give_spots(real_data, name):
    geometry = read_geometry(real_data / "crystfel_geometry" / f"{name}.geom")
    frame, truth = simulate_frame(geometry, 1, SimConfig(cell="thermolysin"))
    assert [p.shape for p in frame.panels] == [p.shape for p in geometry.panels]
    assert truth.reflections["strong"].sum() > 0


def test_randomised_configs_vary_and_run(cspad):
    rng = np.random.default_rng(0)
    configs = [SimConfig.randomised(rng) for _ in range(4)]
    assert len({c.cell for c in configs}) > 1
    for i, cfg in enumerate(configs):
        frame, truth = simulate_frame(cspad, i, cfg)
        assert np.isfinite(np.concatenate([p.ravel() for p in frame.panels])).all()


# Generators of each lattice's holohedry acting on (h, k, l) rows, written out independently of the
# simulator: 4/mmm (c unique), m-3m, 6/mmm (hexagonal axes), -3m (rhombohedral axes), mmm.
_MMM = [np.diag([-1, 1, 1]), np.diag([1, -1, 1]), np.diag([1, 1, -1])]
HOLOHEDRY_GENERATORS = {
    "tetragonal": [np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]),  # 4 along c
                   np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]]), *_MMM],  # 2 along [110]
    "cubic": [np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]),  # 3 along [111]
              np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]]), *_MMM],
    "hexagonal": [np.array([[1, 1, 0], [-1, 0, 0], [0, 0, 1]]),  # 6 along c
                  np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]]), np.diag([1, 1, -1]), -np.eye(3)],
    "rhombohedral": [np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]),  # 3 along [111]
                     np.array([[0, -1, 0], [-1, 0, 0], [0, 0, -1]]), -np.eye(3)],
    "orthorhombic": _MMM, "monoclinic": [np.diag([-1, 1, -1]), -np.eye(3)],
    "triclinic": [-np.eye(3)],
}


@pytest.mark.parametrize("lattice", sorted(HOLOHEDRY_GENERATORS))
def test_structure_intensities_have_the_symmetry_of_the_lattice(lattice):
    """Every reflection a lattice symmetry relates gets the same structure intensity, so that an
    indexer choosing any equivalent setting of the lattice cannot scramble a merge, while
    unrelated reflections differ (the structure is not flat)."""
    from peaknet_xtal.sim.simulate import _structure_intensity

    rng = np.random.default_rng(5)
    hkl = rng.integers(-30, 31, size=(2000, 3))
    ref = _structure_intensity(hkl, 1234, lattice)
    for op in HOLOHEDRY_GENERATORS[lattice]:
        moved = hkl @ op.T.astype(np.int64)
        np.testing.assert_array_equal(_structure_intensity(moved, 1234, lattice), ref,
                                      err_msg=f"{lattice}: not invariant under {op.tolist()}")
    assert np.unique(ref).size > 0.3 * len(ref)
    assert 0.8 < ref.mean() < 1.2  # Wilson: exponential with mean 1


def test_tetragonal_structure_swaps_h_and_k_where_orthorhombic_does_not():
    """The tetragonal form has the 4/mmm swap (h, k) -> (k, h); an orthorhombic cell of the same
    hash key keeps the lower mmm symmetry (its a and b differ)."""
    from peaknet_xtal.sim.simulate import _structure_intensity

    hkl = np.array([[h, k, m] for h in range(1, 12) for k in range(h + 1, 12) for m in range(4)])
    swapped = hkl[:, [1, 0, 2]]
    tet = (_structure_intensity(hkl, 77, "tetragonal"),
           _structure_intensity(swapped, 77, "tetragonal"))
    ortho = (_structure_intensity(hkl, 77, "orthorhombic"),
             _structure_intensity(swapped, 77, "orthorhombic"))
    np.testing.assert_array_equal(*tet)
    assert np.mean(ortho[0] != ortho[1]) > 0.9


def _across(frame, truth) -> np.ndarray:
    """Each strong spot's smaller side-neighbour pair over its brightest pixel (0: narrower than
    a pixel across), on a frame without background or noise."""
    out = []
    for r in truth.reflections[truth.reflections["strong"]]:
        panel = frame.panels[int(r["panel"])]
        y, x = int(r["ss"]), int(r["fs"])
        if not (2 <= y < panel.shape[0] - 2 and 2 <= x < panel.shape[1] - 2):
            continue
        box = panel[y - 1:y + 2, x - 1:x + 2]
        dy, dx = np.unravel_index(int(box.argmax()), box.shape)
        y, x = y + int(dy) - 1, x + int(dx) - 1
        rows = (panel[y, x - 1] + panel[y, x + 1]) / 2
        cols = (panel[y - 1, x] + panel[y + 1, x]) / 2
        out.append(min(rows, cols) / panel[y, x])
    return np.array(out)


def test_sharp_spot_settings_give_spots_about_a_pixel_across(cspad):
    """``sharp_spot_settings``: most strong spots narrower than a pixel across (side neighbours a
    small fraction of the brightest pixel), where the default spots spread over several."""
    from peaknet_xtal.sim import sharp_spot_settings

    quiet = dict(cell="lysozyme", air_photons=0.0, water_photons=0.0, read_noise=0.0,
                 pedestal_sigma=0.0, poisson=False, dead_fraction=0.0, hot_fraction=0.0)
    plain = _across(*simulate_frame(cspad, 5, SimConfig(**quiet)))
    settings = sharp_spot_settings(np.random.default_rng(5))
    assert set(settings) <= {f.name for f in dataclasses.fields(SimConfig)}
    sharp = _across(*simulate_frame(cspad, 5, SimConfig(**quiet, **settings)))
    assert len(plain) > 20 and len(sharp) > 20
    assert np.median(sharp) < 0.15 < np.median(plain) / 2
