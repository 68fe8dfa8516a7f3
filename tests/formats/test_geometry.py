"""CrystFEL geometry: every real file parses, values resolve as CrystFEL does, conversions invert.
"""
from __future__ import annotations

import math
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.errors import FormatError, GeometryError
from peaknet_xtal.formats.geometry import (
    HC_EV_A,
    Geometry,
    parse_geometry,
    parse_vector,
    read_geometry,
    write_geometry,
)

#: Panel counts, counted by hand from the files (distinct 'name/min_fs' names that are not 'bad*').
PANEL_COUNTS = {
    "cheetah2017_cspad-example.geom": 64,
    "crystfel_doc_Eiger16M-binning2-nativefiles.geom": 1,
    "crystfel_doc_cspad-cxiformat.geom": 64,
    "crystfel_doc_cspad-single.geom": 64,
    "crystfel_doc_jf-swissfel-16M.geom": 32,
    "crystfel_doc_lcls-dec.geom": 2,
    "crystfel_doc_lcls-june-r0013-r0128.geom": 2,
    "crystfel_doc_lcls-xpp-estimate.geom": 1,
    "crystfel_doc_pilatus.geom": 1,
    "extrafoam_agipd_mar18_v11.geom": 128,
    "geoassembler_test.geom": 128,
    "jungfraujoch_jf4m.geom": 1,
    "om_lcls_cxi_jungfrau4M.geom": 64,
    "om_lcls_mfx_epix10k2M.geom": 64,
    "om_lcls_rayonix.geom": 1,
    "om_local_pilatus.geom": 1,
    "psgeom_cspad-2x2-approx1.geom": 4,
    "psgeom_cspad_refgeom_crystfel.geom": 64,
    "psgeom_jungfrau-1M-pan.geom": 16,
    "psgeom_pnccd2.geom": 2,
    "yellowsub17_p11eiger.geom": 1,
}

#: One panel, 100 um pixels, beam through (100, 100) px from the corner, 1 Angstrom, 0.1 m.
SIMPLE = f"""\
photon_energy = {HC_EV_A!r} eV
clen = 100 mm
res = 10000  ; 100 um
p0/min_fs = 0
p0/max_fs = 199
p0/min_ss = 0
p0/max_ss = 199
p0/corner_x = -100
p0/corner_y = -100
p0/fs = x
p0/ss = y
"""


def geom_path(real_data: Path, name: str) -> Path:
    return real_data / "crystfel_geometry" / name


def test_every_real_geometry_is_in_the_table(geometry_files: list[Path]) -> None:
    assert sorted(p.name for p in geometry_files) == sorted(PANEL_COUNTS)


@pytest.mark.parametrize("name", sorted(PANEL_COUNTS))
def test_real_geometry_panel_count_and_text_round_trip(real_data: Path, name: str,
                                                       tmp_path: Path) -> None:
    geometry = read_geometry(geom_path(real_data, name))
    assert geometry.n_panels == PANEL_COUNTS[name]
    assert len({p.name for p in geometry.panels}) == geometry.n_panels
    out = tmp_path / "copy.geom"
    write_geometry(geometry, out)
    again = read_geometry(out)
    assert again.n_panels == geometry.n_panels
    dropped = {"badrow_direction"}  # CrystFEL 0.10+ ignores it (with a warning)
    for a, b in zip(geometry.panels, again.panels, strict=True):
        a = replace(a, extra={k: v for k, v in a.extra.items() if k not in dropped})
        if a.clen_m != b.clen_m:  # per-panel distances folded into coffset (one top-level clen)
            assert a.clen_m + a.coffset_m == pytest.approx(b.clen_m + b.coffset_m, abs=1e-12)
            a = replace(a, clen_m=b.clen_m, coffset_m=b.coffset_m)
        assert a.same_as(b), a.name
    # fs/ss bad regions are split per panel and clipped to it: the same pixels stay masked
    for a, b in zip(geometry.bad_pixel_masks(), again.bad_pixel_masks(), strict=True):
        assert np.array_equal(a, b)
    for field in ("data", "dims", "photon_energy_eV", "clen_m", "clen_path", "mask",
                  "mask_good", "mask_bad", "slab_shape"):
        if field in ("clen_m", "clen_path") and getattr(geometry, field) is None:
            continue  # per-panel camera lengths became the one top-level clen (checked above)
        assert getattr(again, field) == getattr(geometry, field), field


def test_units_paths_and_bad_regions_of_real_files(real_data: Path) -> None:
    jf = read_geometry(geom_path(real_data, "crystfel_doc_jf-swissfel-16M.geom"))
    assert jf.clen_m == pytest.approx(0.0953)  # "clen = 95.3 mm"
    assert jf.photon_energy_eV == 4570.0  # "photon_energy = 4570 eV"
    assert jf.wavelength_A == pytest.approx(HC_EV_A / 4570.0)
    assert jf.panel_by_name("m0").min_fs == 0  # written "0.0"
    assert jf.mask_file == "run47.JF06T32V01.mask.h5" and jf.mask_good == 1
    assert [r.panel for r in jf.bad_regions] == ["m15", "m11", "m12", "m16"]
    assert jf.dims == ["%", "ss", "fs"] and jf.data == "/data/data"

    cspad = read_geometry(geom_path(real_data, "crystfel_doc_cspad-single.geom"))
    assert cspad.clen_m is None and cspad.clen_path == "/LCLS/detectorPosition"
    assert cspad.panels[0].clen_path == "/LCLS/detectorPosition"

    rayonix = read_geometry(geom_path(real_data, "om_lcls_rayonix.geom"))
    assert rayonix.clen_m is None and rayonix.panels[0].clen_m == pytest.approx(0.05)
    assert rayonix.dims == ["ss", "fs"]  # "dim0 = %" overridden by a later "dim0 = ss"

    agipd = read_geometry(geom_path(real_data, "extrafoam_agipd_mar18_v11.geom"))
    assert agipd.slab_shape == (16, 512, 128)
    assert agipd.panel_by_name("p15a7").dim_index == {1: 15}
    np.testing.assert_allclose(agipd.panels[0].fs, [-0.001328, -0.999995, 0.0])
    assert agipd.panels[0].coffset_m == pytest.approx(0.001112)

    pilatus = read_geometry(geom_path(real_data, "crystfel_doc_pilatus.geom"))
    kinds = [r.kind for r in pilatus.bad_regions]
    assert kinds.count("xy") == 1 and kinds.count("fs_ss") == 15


def test_globals_apply_only_to_panels_defined_after_them() -> None:
    text = """\
res = 1000
clen = 0.2
a/min_fs = 0
a/max_fs = 9
a/min_ss = 0
a/max_ss = 9
a/corner_x = 0
a/corner_y = 0
res = 2000
adu_per_eV = 0.5
b/min_fs = 10
b/max_fs = 19
b/min_ss = 0
b/max_ss = 9
b/corner_x = 10
b/corner_y = 0
b/clen = 150 mm
a/coffset = 1 mm
"""
    g = parse_geometry(text)
    a, b = g.panels
    assert (a.res, b.res) == (1000.0, 2000.0)
    assert (a.adu_per_eV, b.adu_per_eV) == (None, 0.5)
    assert (a.clen_m, b.clen_m) == (0.2, pytest.approx(0.15))
    assert a.coffset_m == pytest.approx(0.001) and b.coffset_m == 0.0
    np.testing.assert_array_equal(a.fs, [1, 0, 0])  # 0.9-style default directions
    assert g.slab_shape == (10, 20)


@pytest.mark.parametrize("text,expected", [
    ("+0.0010x -0.9999y +0.0z", [0.001, -0.9999, 0.0]),
    ("-x", [-1, 0, 0]),
    ("y", [0, 1, 0]),
    ("1e-3x+1y", [0.001, 1, 0]),
    ("-0.5x + 0.5y +0.2z", [-0.5, 0.5, 0.2]),
])
def test_parse_vector(text: str, expected: list[float]) -> None:
    np.testing.assert_allclose(parse_vector(text), expected)


def test_hand_computed_one_over_d() -> None:
    g = parse_geometry(SIMPLE)
    assert g.wavelength_A == pytest.approx(1.0)
    # pixel (129.5, 99.5): centre 130 px right of the corner = 30 px = 3 mm right of the beam.
    x, y, z = g.panel_to_lab(0, 129.5, 99.5)
    assert (float(x), float(y), float(z)) == pytest.approx((0.003, 0.0, 0.1))
    two_theta = math.atan(0.003 / 0.1)
    expected = 2 * math.sin(two_theta / 2) / 1.0
    assert float(g.panel_to_one_over_d(0, 129.5, 99.5)) == pytest.approx(expected, rel=1e-12)
    assert float(g.panel_to_one_over_d(0, 99.5, 99.5)) == pytest.approx(0.0, abs=1e-12)
    assert float(g.panel_to_one_over_d(0, 129.5, 99.5, wavelength_A=2.0)) == pytest.approx(
        expected / 2)


def _random_pixels(g: Geometry, n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    index = rng.integers(0, g.n_panels, n)
    widths = np.array([p.width for p in g.panels])[index]
    heights = np.array([p.height for p in g.panels])[index]
    pfs = rng.uniform(-0.49, widths - 0.51)  # anywhere on the panel, edges included
    pss = rng.uniform(-0.49, heights - 0.51)
    return index, pfs, pss


@pytest.mark.parametrize("name", ["crystfel_doc_cspad-single.geom",
                                  "crystfel_doc_jf-swissfel-16M.geom",
                                  "crystfel_doc_lcls-june-r0013-r0128.geom"])
def test_round_trips_raw_panel_lab(real_data: Path, name: str) -> None:
    g = read_geometry(geom_path(real_data, name))
    index, pfs, pss = _random_pixels(g, 2000)
    fs, ss = g.panel_to_raw(index, pfs, pss)
    back_index, back_fs, back_ss = g.raw_to_panel(fs, ss)
    np.testing.assert_array_equal(back_index, index)
    np.testing.assert_allclose(back_fs, pfs, atol=1e-9)
    np.testing.assert_allclose(back_ss, pss, atol=1e-9)

    x, y, z = g.panel_to_lab(index, pfs, pss, clen_m=0.12)
    assert np.all(z > 0.1)
    hit, hfs, hss = g.lab_to_panel(3 * x, 3 * y, 3 * z, clen_m=0.12)  # any point on the ray
    np.testing.assert_array_equal(hit, index)
    np.testing.assert_allclose(hfs, pfs, atol=1e-6)
    np.testing.assert_allclose(hss, pss, atol=1e-6)


def test_outside_points_map_to_no_panel(real_data: Path) -> None:
    g = read_geometry(geom_path(real_data, "crystfel_doc_cspad-single.geom"))
    index, pfs, _ = g.raw_to_panel([-5.0, 10_000.0], [0.0, 0.0])
    assert list(index) == [-1, -1] and np.all(np.isnan(pfs))
    hit, _, _ = g.lab_to_panel([0.0, 1.0], [0.0, 0.0], [1.0, -1.0], clen_m=0.1)
    assert list(hit) == [-1, -1]  # the direct beam goes through the central hole; backwards ray
    with pytest.raises(GeometryError, match="camera length"):
        g.panel_to_lab(0, 1.0, 1.0)


def test_split_and_assemble_slab(real_data: Path) -> None:
    g = read_geometry(geom_path(real_data, "crystfel_doc_cspad-single.geom"))
    slab = np.arange(np.prod(g.slab_shape), dtype=np.float32).reshape(g.slab_shape)
    panels = g.split_slab(slab)
    assert len(panels) == 64 and panels[1].shape == (185, 194)
    assert panels[1][0, 0] == slab[0, 194]
    np.testing.assert_array_equal(g.assemble_slab(panels), slab)
    with pytest.raises(GeometryError):
        g.split_slab(slab[:100])

    agipd = read_geometry(geom_path(real_data, "extrafoam_agipd_mar18_v11.geom"))
    block = np.random.default_rng(1).random(agipd.slab_shape)
    parts = agipd.split_slab(block)
    assert parts[8].shape == (64, 128)
    np.testing.assert_array_equal(parts[8], block[1, 0:64, :])  # p1a0: module 1, first ASIC
    np.testing.assert_array_equal(agipd.assemble_slab(parts), block)


def test_a_stacked_layout_is_laid_out_as_one_slab_once(real_data: Path) -> None:
    """The CXI writer asks for a stacked detector's slab layout several times a frame: it is
    made once per geometry; one derived with ``replace`` makes its own, and one sent to another
    process (pickled) goes without it, as large as one never laid out, and gives the same."""
    agipd = read_geometry(geom_path(real_data, "extrafoam_agipd_mar18_v11.geom"))
    unused = pickle.dumps(read_geometry(geom_path(real_data, "extrafoam_agipd_mar18_v11.geom")))
    slab = agipd.as_slab()
    assert slab is agipd.as_slab() and slab.as_slab() is slab and not slab.stacked
    modules, height, width = agipd.slab_shape
    assert slab.slab_shape == (modules * height, width)
    moved = replace(agipd, panels=[replace(p, corner_x=p.corner_x + 1) for p in agipd.panels])
    assert [p.corner_x for p in moved.as_slab().panels] == [p.corner_x + 1 for p in slab.panels]
    assert len(pickle.dumps(agipd)) == len(unused)
    assert pickle.loads(pickle.dumps(agipd)).as_slab().to_text() == slab.to_text()


def test_bad_pixel_masks() -> None:
    text = SIMPLE + """\
p0/mask_edge_pixels = 2
bad_strip/min_fs = 50
bad_strip/max_fs = 52
bad_strip/min_ss = 0
bad_strip/max_ss = 199
bad_strip/panel = p0
bad_stop/min_x = -5
bad_stop/max_x = 5
bad_stop/min_y = -5
bad_stop/max_y = 5
q/min_fs = 0
q/max_fs = 9
q/min_ss = 200
q/max_ss = 209
q/corner_x = 500
q/corner_y = 500
q/no_index = 1
"""
    g = parse_geometry(text)
    good, q = g.bad_pixel_masks()
    assert not q.any()
    assert not good[:2].any() and not good[:, -2:].any() and good[2:-2, 2:-2].any()
    assert not good[10:190, 50:53].any() and good[10:190, 49].all() and good[10:190, 53].all()
    # x/y region: pixel centres within 5 px of the beam, i.e. indices 95..104 around (100, 100)
    assert not good[95:105, 95:105].any()
    assert good[94, 100] and good[105, 100] and good[100, 94] and good[100, 105]
    assert good.shape == (200, 200) and good.sum() == 196 * 196 - 3 * 196 - 100


def test_extra_keys_are_written(tmp_path: Path) -> None:
    out = tmp_path / "peaks.geom"
    write_geometry(parse_geometry(SIMPLE), out, peak_list="/entry_1/result_1",
                   peak_list_type="cxi")
    g = read_geometry(out)
    assert (g.peak_list, g.peak_list_type) == ("/entry_1/result_1", "cxi")
    assert g.panels[0].same_as(parse_geometry(SIMPLE).panels[0])
    assert not list(tmp_path.glob("*.part"))


BAD_INPUTS = [
    ("res = 1000\nthis line has no equals sign\n", 2, "key = value"),
    ("res = 1000\np0/min_fs = zero\n", 2, "not a number"),
    ("res = 1000\np0/min_fs = 0.5\n", 2, "whole number"),
    (SIMPLE.replace("p0/max_ss = 199\n", ""), 4, "no max_ss"),
    (SIMPLE + "bad1/min_fs = 0\nbad1/max_fs = 1\nbad1/min_ss = 0\nbad1/max_ss = 1\n"
              "bad1/panel = nowhere\n", 16, "unknown panel 'nowhere'"),
    (SIMPLE + "bad2/min_x = 0\nbad2/max_x = 1\n", 12, "no min_y, max_y"),
    (SIMPLE + "bad3/min_x = 0\nbad3/max_x = 1\nbad3/min_y = 0\nbad3/min_fs = 3\n", 12, "mixes"),
    (SIMPLE.replace("p0/fs = x", "p0/fs = 1q"), 10, "direction"),
    (SIMPLE.replace("p0/fs = x", "p0/fs = 0x + 0y"), 10, "zero vector"),
    (SIMPLE.replace("clen = 100 mm", "clen = 100 furlongs"), 2, "unknown unit"),
    (SIMPLE.replace("photon_energy", "photon_energy = nine ;"), 1, "not a number"),
    ("dim0 = %\ndim1 = fs\ndim2 = ss\n" + SIMPLE, 3, "ss before"),
    (SIMPLE + "p0/dim0 = banana\n", 12, "expected %"),
    (SIMPLE + "a/b/c = 1\n", 12, "malformed key"),
    (SIMPLE + "mask_good = 0xZZ\n", 12, "0x hex"),
    ("; only a comment\nres = 1\n", None, "no panels"),
]


@pytest.mark.parametrize("text,line,message", BAD_INPUTS)
def test_bad_input_names_file_and_line(tmp_path: Path, text: str, line: int | None,
                                       message: str) -> None:
    path = tmp_path / "broken.geom"
    path.write_text(text)
    with pytest.raises(GeometryError, match=message) as info:
        read_geometry(path)
    assert info.value.path == str(path)
    assert info.value.line == line
    assert str(path) in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot read"):
        read_geometry(tmp_path / "missing.geom")
    binary = tmp_path / "binary.geom"
    binary.write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe")
    with pytest.raises(GeometryError, match="not a text file"):
        read_geometry(binary)


@pytest.mark.parametrize("extra, wavelength, expected", [
    ("adu_per_photon = 7.5\n", None, 7.5),
    ("adu_per_eV = 0.002\n", None, 0.002 * HC_EV_A),  # SIMPLE's photon energy: 1 Angstrom
    ("adu_per_eV = 0.002\n", 2.0, 0.002 * HC_EV_A / 2.0),  # the frame's wavelength wins
    ("", None, None),
])
def test_detector_gain_from_the_geometry(extra: str, wavelength: float | None,
                                         expected: float | None) -> None:
    g = parse_geometry(extra + SIMPLE)
    gain = g.detector_gain(wavelength)
    assert gain == (None if expected is None else pytest.approx(expected))


def test_physical_checks_name_file_and_line() -> None:
    """Sign slips and shared raw pixels are errors at their line, not silently wrong 1/d."""
    with pytest.raises(GeometryError, match=r"g.geom, line 1: photon_energy .* must be positive"):
        parse_geometry(SIMPLE.replace(f"{HC_EV_A!r} eV", "-9537 eV"), "g.geom")
    with pytest.raises(GeometryError, match=r"line 2: camera length .* behind the sample"):
        parse_geometry(SIMPLE.replace("clen = 100 mm", "clen = -100 mm"), "g.geom")
    overlapping = SIMPLE + "".join(line.replace("p0/", "p1/") + "\n"
                                   for line in SIMPLE.splitlines() if line.startswith("p0/"))
    with pytest.raises(GeometryError, match=r"panel p1 .* overlaps panel p0"):
        parse_geometry(overlapping.replace("p1/min_ss = 0", "p1/min_ss = 150").replace(
            "p1/max_ss = 199", "p1/max_ss = 349"), "g.geom")
    with pytest.raises(GeometryError, match=r"line 11: panel p0: fs and ss are parallel"):
        parse_geometry(SIMPLE.replace("p0/ss = y", "p0/ss = -2x"), "g.geom")
    # panels in different slots of an extra dimension (AGIPD-style) share fs/ss ranges legally
    stacked = overlapping.replace("p0/fs = x", "p0/fs = x\np0/dim1 = 0\np0/dim2 = ss\n"
                                  "p0/dim3 = fs").replace(
        "p1/fs = x", "p1/fs = x\np1/dim1 = 1\np1/dim2 = ss\np1/dim3 = fs")
    stacked = stacked.replace("p0/min_fs", "p0/dim0 = %\np0/min_fs").replace(
        "p1/min_fs", "p1/dim0 = %\np1/min_fs")
    assert parse_geometry(stacked).n_panels == 2


def test_detector_gain_needs_panels_to_agree() -> None:
    two = SIMPLE + "".join(line.replace("p0/", "p1/") + "\n" for line in SIMPLE.splitlines()
                           if line.startswith("p0/"))
    # p1 reads the next 200 rows of the slab (panels may not share raw pixels)
    two = two.replace("p1/min_ss = 0", "p1/min_ss = 200").replace("p1/max_ss = 199",
                                                                  "p1/max_ss = 399")
    assert parse_geometry(two.replace("p0/min_fs", "p0/adu_per_photon = 3\np0/min_fs")
                          ).detector_gain() is None
    both = two.replace("p0/min_fs", "p0/adu_per_photon = 3\np0/min_fs").replace(
        "p1/min_fs", "p1/adu_per_photon = 3\np1/min_fs")
    assert parse_geometry(both).detector_gain() == 3.0


@pytest.mark.parametrize(("change", "message"), [
    (("p0/fs = x", "p0/fs = xx"), r"line 10: p0/fs = 'xx' is not a direction .* needs its sign"),
    (("p0/ss = y", "p0/ss = y2x"), r"line 11: p0/ss = 'y2x' is not a direction"),
    (("p0/max_fs = 199", "p0/max_fss = 199"),
     r"line 5: panel p0 has no max_fs: 'p0/max_fss' is not a geometry key \(a typo for "
     r"'p0/max_fs'\?\)"),
])
def test_typos_are_errors_at_their_line(change, message) -> None:
    """A typo is named where it is: 'xx' once read as 2x (twice the pixel spacing, wrong 1/d),
    and a misspelt key left only 'panel p0 has no max_fs' at the panel's first line."""
    with pytest.raises(GeometryError, match=message):
        parse_geometry(SIMPLE.replace(*change), "g.geom")
