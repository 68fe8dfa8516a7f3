"""CrystFEL geometry keys a CrystFEL user relies on: per-panel ``data``, masks 0-7, beam and camera
length values read from HDF5 paths with their units, and files CrystFEL refuses.

Each test states the rule from ``crystfel_geometry(5)`` it checks; the images are small h5py files.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_xtal.errors import FormatError, GeometryError
from peaknet_xtal.formats.cxi import (
    MASK_PATH,
    PHOTON_ENERGY_PATH,
    cxi_geometry,
    iter_cxi_frames,
    write_cxi,
)
from peaknet_xtal.formats.geometry import HC_EV_A, MAX_MASKS, parse_geometry
from peaknet_xtal.formats.geometry_rules import crystfel_problems, errors_only
from peaknet_xtal.types import FrameResult, empty_peaks

SHAPE = (2, 8, 6)  # frames, ss, fs: two 4x6 panels, one above the other


def geom(top: str = "", p0: str = "", p1: str = "", end: str = "", *,
         beam: str | None = "photon_energy = 9000 eV", clen: str | None = "clen = 0.1 m",
         data: str | None = "/entry/data") -> str:
    """Two 6x4 panels in one (%, ss, fs) stack; ``top`` goes above the panels, ``p0``/``p1``
    (keys without the panel name) into each panel, ``end`` after them."""
    lines = [line for line in (beam, clen) if line]
    lines += ["res = 10000", "adu_per_photon = 1", "dim0 = %", "dim1 = ss", "dim2 = fs"]
    if data:
        lines.append(f"data = {data}")
    lines += top.splitlines()
    for i, (name, own) in enumerate((("p0", p0), ("p1", p1))):
        lines += [f"{name}/min_fs = 0", f"{name}/max_fs = 5", f"{name}/min_ss = {4 * i}",
                  f"{name}/max_ss = {4 * i + 3}", f"{name}/corner_x = -3",
                  f"{name}/corner_y = {-4 + 4 * i}", f"{name}/fs = x", f"{name}/ss = y"]
        lines += [f"{name}/{line}" for line in own.splitlines()]
    return "\n".join(lines + end.splitlines()) + "\n"


def line_of(text: str, start: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(start))


def stack(path: Path, dataset: str = "/entry/data", **more: np.ndarray) -> np.ndarray:
    """An image stack of ``SHAPE`` at ``dataset`` plus ``more`` datasets ({"a/b": array})."""
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    with h5py.File(path, "a") as h5:
        h5[dataset] = data
        for name, values in more.items():
            h5["/" + name] = values
    return data


def frame_masks(path: Path, geometry) -> list[np.ndarray]:
    """Each frame's good-pixel mask, (ss, fs) of the whole slab."""
    return [geometry.assemble_slab(f.masks, fill=False) for f in iter_cxi_frames(path, geometry)]


# ---- 1: a panel's own data key -----------------------------------------------------------------

@pytest.mark.parametrize("p1_ss", [4, 0], ids=["apart", "same-ranges"])
def test_panels_in_two_datasets_are_refused_naming_both(p1_ss):
    """``data`` is a panel key; two datasets were read as one (wrong pixels) or, with the same
    fs/ss ranges, said to overlap.  One error names the line, both datasets and what works."""
    text = geom(p1="data = /b/data", data="/a/data")
    text = text.replace("p1/min_ss = 4", f"p1/min_ss = {p1_ss}")
    text = text.replace("p1/max_ss = 7", f"p1/max_ss = {p1_ss + 3}")
    with pytest.raises(GeometryError) as err:
        parse_geometry(text, "split.geom")
    message = str(err.value)
    assert f"split.geom, line {line_of(text, 'p1/data')}" in message
    assert "/a/data" in message and "/b/data" in message and "overlaps" not in message
    assert "one dataset" in message and "dim1" in message


def test_a_dataset_changed_between_panels_is_refused():
    text = geom(data="/a/data").replace("p1/min_fs", "data = /b/data\np1/min_fs", 1)
    with pytest.raises(GeometryError, match="/b/data .*/a/data"):
        parse_geometry(text, "g.geom")


def test_one_dataset_named_per_panel_or_repeated_reads_as_one(tmp_path):
    """A panel's ``data`` equal to the top-level one, or every panel naming the same dataset with
    no top-level one, is one dataset: frames are read from it, and written back with it."""
    repeated = parse_geometry(geom(data="/entry/data", p1="data = /entry/data"))
    per_panel = parse_geometry(geom(data=None, p0="data = /x/data", p1="data = /x/data"))
    assert repeated.data == "/entry/data" and per_panel.data == "/x/data"
    path = tmp_path / "x.h5"
    data = stack(path, "/x/data")
    frames = list(iter_cxi_frames(path, per_panel))
    np.testing.assert_array_equal(per_panel.assemble_slab(frames[1].panels), data[1])
    assert parse_geometry(per_panel.to_text()).data == "/x/data"


# ---- 2: masks 0 to 7 ----------------------------------------------------------------------------

def test_every_mask_0_to_7_masks_pixels(tmp_path):
    """A pixel is bad when any of masks 0-7 says so: goodbits all set, no badbit set.  Masks 1-7
    were dropped, their bad pixels used."""
    m0 = np.ones(SHAPE[1:], np.uint8)
    m0[0, 0] = 0  # goodbit 0x1 missing
    m3 = np.zeros(SHAPE, np.uint16)
    m3[1, 5, 2] = 0x4  # badbit, frame 1 only
    m3[0, 2, 2] = 0x2  # not a badbit
    m7 = np.full(SHAPE[1:], 0x3, np.uint8)
    m7[6, 4] = 0x1  # goodbits 0x3 not all set
    other = tmp_path / "extra_mask.h5"
    with h5py.File(other, "w") as h5:
        h5["/m7"] = m7
    text = geom(top=f"mask0_data = /m0\nmask0_goodbits = 0x1\nmask3_data = /m3\n"
                    f"mask3_badbits = 0x4\nmask7_file = {other}\nmask7_data = /m7\n"
                    "mask7_goodbits = 3")
    geometry = parse_geometry(text)
    path = tmp_path / "run.h5"
    stack(path, m0=m0, m3=m3)
    masks = frame_masks(path, geometry)
    expected = np.ones((2, *SHAPE[1:]), bool)
    expected[:, 0, 0] = False
    expected[1, 5, 2] = False
    expected[:, 6, 4] = False
    np.testing.assert_array_equal(np.stack(masks), expected)


def test_a_panels_own_mask_covers_that_panel_only(tmp_path):
    """Mask keys are panel keys: ``p1/mask2_data`` masks p1's pixels, not p0's."""
    m2 = np.ones(SHAPE[1:], np.uint8)
    m2[1, 1] = m2[5, 1] = 0  # one pixel on each panel
    geometry = parse_geometry(geom(p1="mask2_data = /m2\nmask2_goodbits = 1"))
    path = tmp_path / "run.h5"
    stack(path, m2=m2)
    mask = frame_masks(path, geometry)[0]
    assert mask[1, 1] and not mask[5, 1] and mask.sum() == mask.size - 1
    assert [[s.index for s in specs] for specs in geometry.panel_masks()] == [[], [2]]


def test_a_top_level_mask_applies_to_the_panels_after_it_also_when_written(tmp_path):
    """A top-level mask is a default for panels defined after it only: here p0 has no mask 1;
    the written geometry must say the same, or indexamajig masks p0 with it."""
    text = geom().replace("p1/min_fs", "mask1_data = /m1\nmask1_badbits = 0x1\np1/min_fs", 1)
    geometry = parse_geometry(text)
    m1 = np.ones(SHAPE[1:], np.uint8)  # every pixel flagged bad
    path = tmp_path / "run.h5"
    stack(path, m1=m1)
    mask = frame_masks(path, geometry)[0]
    assert mask[:4].all() and not mask[4:].any()
    again = parse_geometry(geometry.to_text())
    assert again.panel_masks() == geometry.panel_masks()
    assert [len(specs) for specs in again.panel_masks()] == [0, 1]


def test_masks_survive_a_rewrite_and_fold_into_the_cxi_output(tmp_path):
    """The written input geometry keeps masks 1-7; the CXI output holds them in its one mask
    and its geometry names only that one (as for mask 0), so indexamajig masks the same."""
    m5 = np.zeros(SHAPE, np.uint8)
    m5[:, 3, 3] = 0x10
    geometry = parse_geometry(geom(top="mask5_data = /m5\nmask5_badbits = 0x10"))
    assert parse_geometry(geometry.to_text()).panel_masks() == geometry.panel_masks()
    src = tmp_path / "run.h5"
    stack(src, m5=m5)
    results = [FrameResult(frame=f, peaks=empty_peaks(), hit=True)
               for f in iter_cxi_frames(src, geometry)]
    out = tmp_path / "out.cxi"
    write_cxi(out, results, geometry, mode="copy")
    with h5py.File(out) as h5:
        stored = h5[MASK_PATH][()]
    assert not stored[:, 3, 3].any() and stored.sum() == stored.size - 2
    written = parse_geometry(cxi_geometry(geometry).to_text())
    assert [[(s.index, s.data) for s in specs] for specs in written.panel_masks()] == [
        [(0, MASK_PATH)]] * 2


def test_free_mask_slot_is_the_first_number_no_panel_uses():
    assert parse_geometry(geom()).free_mask_slot() == 0
    assert parse_geometry(geom(top="mask = /m\nmask1_data = /m1")).free_mask_slot() == 2
    assert parse_geometry(geom(top="mask0_data = /m", p1="mask2_data = /m")).free_mask_slot() == 1
    every = "\n".join(f"mask{n}_data = /m{n}" for n in range(MAX_MASKS))
    assert parse_geometry(geom(top=every)).free_mask_slot() is None


@pytest.mark.parametrize("bad, message", [
    ("mask8_data = /m", "numbered 0 to 7"),
    ("mask3_goodbits = 0x1", "mask3_goodbits without mask3_data"),
    ("mask2_data = m2", "starting with '/'"),
    ("mask1_badbits = lots", "not an integer"),
])
def test_a_mask_crystfel_refuses_is_an_error_with_its_line(bad, message):
    text = geom(p1=bad)
    with pytest.raises(GeometryError, match=message) as err:
        parse_geometry(text, "m.geom")
    assert f"line {line_of(text, 'p1/' + bad.split()[0])}" in str(err.value)


def test_zero_bits_without_a_mask_are_accepted_as_crystfel_does():
    """CrystFEL refuses a mask file or nonzero bits without a mask location; zero bits do
    nothing and pass."""
    assert parse_geometry(geom(p1="mask4_badbits = 0")).free_mask_slot() == 0


def test_a_mask_without_bits_masks_nothing_as_in_crystfel_and_says_so(tmp_path, caplog):
    """crystfel_geometry(5): a pixel is bad unless every goodbit is set, or if any badbit is;
    both default to 0, so a mask given without them marks no pixel bad.  Read as "nonzero =
    good", a Cheetah-style mask (0 = good) given so masked every good pixel, silently."""
    cheetah = np.zeros(SHAPE[1:], np.uint16)
    cheetah[2, 3] = 0x8  # bad in the file's own convention
    path = tmp_path / "run.h5"
    stack(path, pixelmask=cheetah)
    for top in ("mask = /pixelmask", "mask2_data = /pixelmask"):
        caplog.clear()
        geometry = parse_geometry(geom(top=top), str(tmp_path / f"{top[:5]}.geom"))
        masks = frame_masks(path, geometry)
        assert all(m.all() for m in masks)
        said = [r.getMessage() for r in caplog.records if "marks no pixel bad" in r.getMessage()]
        assert len(said) == 1 and ("mask_good" if top.startswith("mask =") else "mask2_goodbits"
                                   ) in said[0]
    geometry = parse_geometry(geom(top="mask = /pixelmask\nmask_bad = 0xffff"))
    (first, second) = frame_masks(path, geometry)
    assert not first[2, 3] and first.sum() == first.size - 1 and (second == first).all()


@pytest.mark.parametrize("line", ["mask = /%/m", "mask5_data = /%/m5",
                                  "saturation_map = /%/sat"])
def test_a_location_with_more_placeholders_than_the_data_path_is_refused(line):
    """CrystFEL takes a mask's (or saturation map's) placeholder values from the data path's
    event and refuses a location with more of them than the data path has."""
    with pytest.raises(GeometryError, match="more '%' placeholders than the data path"):
        parse_geometry(geom(top=f"{line}\nmask_good = 1"))
    assert parse_geometry(geom(top=f"{line}\nmask_good = 1", data="/%/data")).data == "/%/data"


def test_a_missing_mask_file_is_an_error_naming_the_key_and_the_geometry(tmp_path,
                                                                          monkeypatch):
    """CrystFEL stops when a mask file is missing; so do we, saying which geometry key named it
    and where a relative name was looked for (the working directory)."""
    path = tmp_path / "run.h5"
    stack(path)
    monkeypatch.chdir(tmp_path)
    for top, key in (("mask_file = gone.h5\nmask = /m\nmask_good = 1", "mask_file"),
                     ("mask4_file = gone.h5\nmask4_data = /m\nmask4_badbits = 1", "mask4_file")):
        geometry = parse_geometry(geom(top=top), "det.geom")
        with pytest.raises(FormatError, match="mask file not found") as err:
            frame_masks(path, geometry)
        said = str(err.value)
        assert "gone.h5" in said and f"{key} in the geometry det.geom" in said
        assert str(tmp_path) in said and "a relative name is taken" in said
    # an absolute name was looked for where it says, not in the working directory
    geometry = parse_geometry(geom(top="mask_file = /gpfs/gone.h5\nmask = /m\nmask_good = 1"),
                              "det.geom")
    with pytest.raises(FormatError, match="/gpfs/gone.h5: mask file not found") as err:
        frame_masks(path, geometry)
    assert "relative" not in str(err.value) and str(tmp_path) not in str(err.value)


def test_the_rules_checker_refuses_a_mask_numbered_8():
    """CrystFEL keeps masks 0-7 and does not check the number of ``mask8_data``."""
    text = geom(top="mask8_data = /m8")
    assert any("mask8_data" in p for p in errors_only(crystfel_problems(text)))
    assert not errors_only(crystfel_problems(geom(top="mask7_data = /m7")))


# ---- 3: beam and camera length as HDF5 paths with units ---------------------------------------

@pytest.mark.parametrize("line, stored, energy_eV", [
    ("wavelength = /LCLS/wavelength m", [1.0e-10, 1.2e-10], [HC_EV_A, HC_EV_A / 1.2]),
    ("wavelength = /LCLS/wavelength A", [1.0, 2.0], [HC_EV_A, HC_EV_A / 2]),
    ("photon_energy = /LCLS/photon_energy keV", [9.5, 12.0], [9500.0, 12000.0]),
    ("photon_energy = /LCLS/photon_energy", [9500.0, 12000.0], [9500.0, 12000.0]),
])
def test_beam_values_read_from_a_path_use_the_unit_of_the_line(tmp_path, line, stored, energy_eV):
    """``PATH unit`` (the manual's ``wavelength = /data/LCLS/wavelength m``): the unit was kept
    on the path, nothing was read, NaN energies were written; a wavelength was read as eV."""
    geometry = parse_geometry(geom(beam=line))
    assert geometry.photon_energy_path == line.split()[2]
    path = tmp_path / "run.h5"
    stack(path, **{line.split()[2].lstrip("/"): np.array(stored)})
    frames = list(iter_cxi_frames(path, geometry))
    assert [HC_EV_A / f.meta["wavelength_A"] for f in frames] == pytest.approx(energy_eV)
    out = tmp_path / "out.cxi"
    write_cxi(out, [FrameResult(frame=f, peaks=empty_peaks(), hit=True) for f in frames],
              geometry, mode="copy")
    with h5py.File(out) as h5:
        assert h5[PHOTON_ENERGY_PATH][()] == pytest.approx(energy_eV)
    assert parse_geometry(geometry.to_text()).photon_energy_path_unit == (
        geometry.photon_energy_path_unit)


def test_electron_voltage_from_a_path_matches_the_number(tmp_path):
    """``electron_voltage = /path kV`` gives the electron wavelength the numeric line gives."""
    numeric = parse_geometry(geom(beam="electron_voltage = 200 kV"))
    geometry = parse_geometry(geom(beam="electron_voltage = /em/voltage kV"))
    path = tmp_path / "run.h5"
    stack(path, **{"em/voltage": np.array(200.0)})
    frame = next(iter(iter_cxi_frames(path, geometry)))
    assert frame.meta["wavelength_A"] == pytest.approx(numeric.wavelength_A)
    assert 0.02 < frame.meta["wavelength_A"] < 0.03  # 200 keV electrons: 0.0251 A


@pytest.mark.parametrize("line, message", [
    ("wavelength = /LCLS/wavelength", "needs its unit"),
    ("electron_voltage = /em/voltage", "needs its unit"),
    ("photon_energy = /LCLS/photon_energy nm", "unknown unit 'nm'"),
    ("wavelength = /LCLS/wavelength m extra", "one unit"),
])
def test_a_beam_path_without_a_usable_unit_is_an_error(line, message):
    text = geom(beam=line)
    with pytest.raises(GeometryError, match=message) as err:
        parse_geometry(text, "b.geom")
    assert "line 1" in str(err.value)


def test_camera_length_path_keeps_its_unit_and_refuses_others():
    geometry = parse_geometry(geom(clen="clen = /LCLS/detector_distance mm"))
    assert geometry.camera_length_path == "/LCLS/detector_distance mm"
    with pytest.raises(GeometryError, match="m or mm"):
        parse_geometry(geom(clen="clen = /LCLS/detector_distance inch"))


# ---- 4: what CrystFEL refuses ---------------------------------------------------------------

def test_a_group_naming_an_unknown_panel_is_an_error_with_its_line():
    text = geom(end="group_all = p0,p7")
    with pytest.raises(GeometryError, match="unknown panel or group 'p7'") as err:
        parse_geometry(text, "g.geom")
    assert f"line {line_of(text, 'group_all')}" in str(err.value)


def test_a_group_before_its_members_is_an_error_and_after_them_is_fine():
    with pytest.raises(GeometryError, match="further down"):
        parse_geometry(geom(top="group_all = p0,p1"))
    ok = parse_geometry(geom(end="group_q0 = p0,p1\ngroup_all = q0"))
    assert ok.n_panels == 2 and ok.keys["group_all"] == "q0"


def test_a_panel_default_after_the_last_panel_is_an_error_with_its_line():
    """``res = 5000`` after every panel applies to none; CrystFEL refuses the file."""
    text = geom(end="res = 5000")
    with pytest.raises(GeometryError, match="after the last panel") as err:
        parse_geometry(text, "t.geom")
    assert f"line {line_of(text, 'res = 5000')}" in str(err.value)
    # top-level-only keys and groups may follow the panels
    fine = parse_geometry(geom(clen=None, end="clen = 0.2 m\ngroup_all = p0,p1"))
    assert fine.clen_m == pytest.approx(0.2)


@pytest.mark.parametrize("missing", ["clen", "beam"])
def test_a_geometry_indexamajig_would_refuse_parses_and_says_why(missing):
    """Peak finding needs no camera length; indexamajig refuses a geometry without one (or
    without a wavelength), so the geometry says so rather than failing to parse."""
    geometry = parse_geometry(geom(**{missing: None}))
    problems = geometry.indexamajig_problems()
    assert len(problems) == 1
    assert ("camera length" if missing == "clen" else "photon energy") in problems[0]
    assert any(("camera length" if missing == "clen" else "wavelength") in p
               for p in errors_only(crystfel_problems(geometry.to_text())))
    complete = parse_geometry(geom(clen="clen = /LCLS/distance mm",
                                   beam="wavelength = /LCLS/wavelength m"))
    assert complete.indexamajig_problems() == []


# ---- bad input CrystFEL refuses, or accepts although it cannot be meant -------------------------

def warned(text: str, caplog) -> list[str]:
    """``Geometry.warnings`` of ``text``, checked to be logged as warnings too."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="peaknet_xtal.formats.geometry"):
        geometry = parse_geometry(text, "x.geom")
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert all(w in logged for w in geometry.warnings), (geometry.warnings, logged)
    return geometry.warnings


def test_a_clean_geometry_has_no_warnings(caplog):
    assert warned(geom(), caplog) == []


@pytest.mark.parametrize("value", ["-3", "0"])
@pytest.mark.parametrize("where", ["top", "p0"])
def test_a_gain_not_above_zero_is_a_warning_with_its_line(value, where, caplog):
    """CrystFEL reads adu_per_photon with atof and never checks it; this project took a gain <= 0
    as "none declared" without a word (and wrote a measured one in its place)."""
    text = (geom().replace("adu_per_photon = 1", f"adu_per_photon = {value}") if where == "top"
            else geom(p0=f"adu_per_photon = {value}"))
    got = warned(text, caplog)
    assert len(got) == 1, got
    start = "adu_per_photon" if where == "top" else "p0/adu_per_photon"
    assert f"x.geom, line {line_of(text, start)}: {start} = {value}: a detector gain must be " \
           "positive" in got[0]
    assert "this project ignores the line" in got[0]
    if where == "top":  # no other gain line: none declared (the finder estimates one)
        assert parse_geometry(text).detector_gain() is None


def test_max_adu_not_above_zero_is_a_warning_and_kept(caplog):
    """CrystFEL takes any max_adu (warning that it is better not set); 0 makes every pixel above
    zero saturated."""
    text = geom(top="max_adu = 0")
    got = warned(text, caplog)
    assert len(got) == 1 and f"line {line_of(text, 'max_adu')}: max_adu = 0:" in got[0], got
    assert "max_adu = 0" in parse_geometry(text).to_text()  # passed on as given, said so
    assert warned(geom(top="max_adu = 16000"), caplog) == []


@pytest.mark.parametrize(("clen", "words"), [
    ("clen = 0.1 mm", "0.0001 m from the sample"),
    ("clen = 70", "'70 mm' would be millimetres"),
    ("clen = 12 m", "12 m from the sample"),
])
def test_an_implausible_camera_length_is_a_warning(clen, words, caplog):
    """CrystFEL takes any number as clen (metres without a unit)."""
    text = geom(clen=clen)
    got = warned(text, caplog)
    assert len(got) == 1 and f"line {line_of(text, 'clen')}: clen = " in got[0], got
    assert words in got[0]
    for fine in ("clen = 0.05 m", "clen = 95 mm", "clen = 3.5", "clen = /LCLS/detector_z mm"):
        assert warned(geom(clen=fine), caplog) == [], fine


def test_a_panel_key_given_twice_with_two_values_is_a_warning(caplog):
    """CrystFEL's parse_field_for_panel overwrites: the last value wins, without a word."""
    text = geom(p0="corner_x = 50")
    got = warned(text, caplog)
    assert len(got) == 1 and "p0/corner_x given twice ('-3' on line" in got[0], got
    assert f"line {line_of(text, 'p0/corner_x = 50')}:" in got[0]
    assert parse_geometry(text).panels[0].corner_x == 50
    assert warned(geom(p0="corner_x = -3"), caplog) == []  # the same line twice: harmless
    region = "\nbad1/min_fs = 0\nbad1/max_fs = 1\nbad1/min_ss = 0\nbad1/max_ss = 1\nbad1/panel = p0"
    got = warned(geom(end=region + "\nbad1/max_fs = 2"), caplog)
    assert len(got) == 1 and "bad1/max_fs given twice" in got[0], got


def test_a_flag_given_twice_says_crystfel_applies_both(caplog):
    """CrystFEL adds each flag_* value to the panel's list of flags (add_flag_value)."""
    got = warned(geom(p0="flag_equal = 5\nflag_equal = 7"), caplog)
    assert len(got) == 1 and "CrystFEL applies both values" in got[0], got


def test_an_unknown_panel_key_is_a_warning_and_a_comment_in_the_output(caplog):
    """CrystFEL: ERROR("Unrecognised field '%s'"), and it goes on (reject stays 0)."""
    text = geom(p0="frobnicate = 1")
    got = warned(text, caplog)
    assert len(got) == 1, got
    assert f"line {line_of(text, 'p0/frobnicate')}: 'p0/frobnicate' is not a CrystFEL" in got[0]
    assert "Unrecognised field 'frobnicate'" in got[0]
    out = parse_geometry(text).to_text()
    assert "\np0/frobnicate" not in out and "kept as a comment: p0/frobnicate = 1" in out
    assert errors_only(crystfel_problems(out)) == []
    got = warned(geom(top="frobnicate = 1"), caplog)  # top level: the same message
    assert len(got) == 1 and "'frobnicate' is not a CrystFEL geometry key" in got[0], got


@pytest.mark.parametrize(("limits", "words"), [
    ("min_fs = 4\nbad1/max_fs = 1\nbad1/min_ss = 0\nbad1/max_ss = 1\nbad1/panel = p0",
     "min_fs = 4 is above max_fs = 1"),
    ("min_x = -1\nbad1/max_x = 1\nbad1/min_y = 3\nbad1/max_y = 2", "min_y = 3 is above max_y"),
])
def test_a_bad_region_with_min_above_max_is_a_warning(limits, words, caplog):
    """CrystFEL's in_bad_region tests min <= v <= max: such a region masks nothing, silently."""
    text = geom(end="bad1/" + limits)
    got = warned(text, caplog)
    assert len(got) == 1 and words in got[0] and "covers no pixel" in got[0], got


@pytest.mark.parametrize(("lines", "words"), [
    ("rigid_group_q0 = p0,nosuch", "rigid_group_q0: unknown panel 'nosuch'"),
    ("rigid_group_q0 = p0\nrigid_group_collection_c = q0,q9",
     "rigid_group_collection_c: unknown rigid group 'q9'"),
])
def test_a_rigid_group_naming_nothing_is_a_warning_with_its_line(lines, words, caplog):
    """CrystFEL 0.10: "Cannot add panel to rigid group" / "Panel not found", and the whole
    geometry is refused; 0.11+ ignores rigid groups, so the file is read, with a warning
    (the line goes to output geometries as it stands)."""
    text = geom(end=lines)
    got = warned(text, caplog)
    assert len(got) == 1 and words in got[0] and "0.10 refuses" in got[0], got
    assert f"line {len(text.splitlines())}:" in got[0]
    assert any(words.split(":")[0] in p for p in errors_only(crystfel_problems(text)))
    assert warned(geom(end="rigid_group_q0 = p0,p1\nrigid_group_collection_c = q0"),
                  caplog) == []


def test_a_byte_order_mark_is_an_error_saying_what_it_is(tmp_path):
    """CrystFEL does not skip a BOM: it is part of line 1 ("Bad line in geometry file")."""
    path = tmp_path / "bom.geom"
    path.write_bytes(b"\xef\xbb\xbf; comment\n" + geom().encode())
    with pytest.raises(GeometryError, match="byte-order mark") as info:
        from peaknet_xtal.formats.geometry import read_geometry
        read_geometry(path)
    assert info.value.line == 1 and "without BOM" in str(info.value)
