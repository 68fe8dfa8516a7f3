"""CXI/HDF5 images and CXI peak tables on real h5py files."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.cxi import (
    DATA_PATH,
    CXISource,
    CXIWriter,
    inspect_cxi,
    iter_cxi_frames,
    read_cxi_frame,
    read_cxi_peaks,
    sniff_cxi,
    write_cxi,
    write_cxi_geometry,
)
from peaknet_xtal.formats.geometry import parse_geometry, read_geometry
from peaknet_xtal.types import FrameResult, peaks_from_columns

BAD_CORNER = """\
bad_corner/min_fs = 0
bad_corner/max_fs = 1
bad_corner/min_ss = 16
bad_corner/max_ss = 17
bad_corner/panel = bottom
"""
#: Two 32x16 panels (a gap between them) in a 32x32 CXI stack, with a bad region.
CXI_GEOMETRY = {"names": ["top", "bottom"], "width": 32, "height": 16,
                "corners": [(-16.0, 2.0), (-16.0, -18.0)], "photon_energy": "9500 eV",
                "clen": "0.120 m", "adu_per_photon": "1", "extra": BAD_CORNER}


@pytest.fixture()
def geom_text(make_geometry_text) -> str:
    return make_geometry_text(**CXI_GEOMETRY)


@pytest.fixture()
def geom_path(tmp_path: Path, geom_text: str) -> Path:
    path = tmp_path / "two.geom"
    path.write_text(geom_text)
    return path


@pytest.fixture()
def geometry(geom_path: Path):
    return read_geometry(geom_path)


def make_stack(path: Path, n: int = 4, shape: tuple[int, int] = (32, 32),
               dataset: str = "/entry_1/data_1/data") -> np.ndarray:
    rng = np.random.default_rng(7)
    data = rng.integers(-5, 1000, size=(max(n, 1), *shape)).astype(np.int32)
    data = data if n else data[0]  # n = 0: one 2-D frame, not a stack
    with h5py.File(path, "w") as h5:
        h5.create_dataset(dataset, data=data)
    return data


def test_stack_is_split_into_panels_with_keys_back_to_the_file(tmp_path, geometry):
    path = tmp_path / "run.cxi"
    data = make_stack(path, n=4)
    frames = list(iter_cxi_frames(path, geometry))
    assert [f.event for f in frames] == ["//0", "//1", "//2", "//3"]
    assert all(f.source == str(path) for f in frames)
    third = frames[2]
    assert [p.shape for p in third.panels] == [(16, 32), (16, 32)]
    assert third.panels[0].dtype == np.float32
    np.testing.assert_array_equal(third.panels[1], data[2, 16:32, :])
    assert third.meta == {"h5_file": str(path), "h5_dataset": "/entry_1/data_1/data",
                          "h5_index": 2, "slab_shape": (32, 32), "dtype": str(data.dtype)}
    # the geometry's bad region masks the bottom panel's first 2x2 pixels, nothing else
    assert third.masks[1][:2, :2].sum() == 0 and third.masks[1].sum() == 32 * 16 - 4
    assert third.masks[0].all()


def test_single_frame_and_default_data_path_without_geometry(tmp_path):
    path = tmp_path / "one.h5"
    data = make_stack(path, n=0, shape=(10, 12), dataset="/data/data")
    info = inspect_cxi(path)
    assert (info.dataset, info.n_frames, info.stacked) == ("/data/data", 1, False)
    frame = read_cxi_frame(path)
    assert frame.event == "//" and len(frame.panels) == 1
    np.testing.assert_array_equal(frame.panels[0], data)
    assert frame.meta["h5_index"] is None


@pytest.mark.parametrize("dtype,step,marks_as", [
    ("uint16", 1, "uint16"), ("uint32", 1, "uint32"), ("int32", 1, "int32"),
    ("float32", 1, "uint16"), ("float32", 0.5, "float32"), ("float64", 0.25, "float64")])
def test_frames_keep_the_type_they_were_stored_as(tmp_path, dtype, step, marks_as):
    """Frames come out float32; the type by which their values mark gaps
    (finding.sanitise.marked_pixels) travels in meta for the engine: the stored type of
    integer data, and the type whole-number floats imply (as every entry point reads them);
    floats with fractions mark nothing."""
    path = tmp_path / "one.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/data/data",
                          data=(np.arange(120).reshape(10, 12) * step).astype(dtype))
    frame = read_cxi_frame(path)
    assert frame.panels[0].dtype == np.float32
    assert frame.meta["dtype"] == marks_as


def test_static_mask_dataset_combines_with_geometry_mask(tmp_path, geometry):
    path = tmp_path / "masked.cxi"
    make_stack(path, n=2)
    mask = np.ones((32, 32), dtype=np.uint8)
    mask[5, 7] = 0  # top panel
    with h5py.File(path, "a") as h5:
        h5["/entry_1/data_1/mask"] = mask
    frame = read_cxi_frame(path, 1, geometry)
    assert not frame.masks[0][5, 7] and frame.masks[0].sum() == 32 * 16 - 1
    assert frame.masks[1].sum() == 32 * 16 - 4


@pytest.mark.parametrize("shape", [(4, 30, 32), (4, 32, 20), (2, 3, 32, 32)])
def test_data_not_matching_geometry_names_file_and_dataset(tmp_path, geometry, shape):
    path = tmp_path / "bad.cxi"
    with h5py.File(path, "w") as h5:
        h5["/entry_1/data_1/data"] = np.zeros(shape, dtype=np.float32)
    with pytest.raises(FormatError) as err:
        inspect_cxi(path, geometry)
    assert err.value.path == str(path) and err.value.dataset == "/entry_1/data_1/data"
    assert str(path) in str(err.value)


def test_missing_dataset_not_hdf5_and_truncated_file(tmp_path, geometry):
    empty = tmp_path / "empty.cxi"
    with h5py.File(empty, "w") as h5:
        h5["/other"] = np.zeros(3)
    with pytest.raises(FormatError, match="dataset /entry_1/data_1/data: dataset not found"):
        inspect_cxi(empty, geometry)
    with pytest.raises(FormatError, match="no image dataset found") as err:
        inspect_cxi(empty)
    assert "image-like" not in str(err.value)  # a 1-D dataset is no image
    eiger = tmp_path / "eiger.h5"  # an Eiger still as some writers store it: /data, read
    with h5py.File(eiger, "w") as h5:
        h5["/data"] = np.zeros((1, 12, 10), np.uint16)
    assert inspect_cxi(eiger).dataset == "/data"
    other = tmp_path / "other.h5"  # elsewhere: the error names what may be meant
    with h5py.File(other, "w") as h5:
        h5["/run/images"] = np.zeros((1, 12, 10), np.uint16)
    with pytest.raises(FormatError, match=r"image-like datasets here: /run/images \(1, 12, "
                                          r"10\) uint16 \(name one with a geometry's 'data' key"):
        inspect_cxi(other)
    text = tmp_path / "text.cxi"
    text.write_text("not hdf5\n")
    with pytest.raises(FormatError, match="not a readable HDF5 file"):
        inspect_cxi(text)
    whole = tmp_path / "whole.cxi"
    make_stack(whole, n=3)
    cut = tmp_path / "cut.cxi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(FormatError) as err:
        list(iter_cxi_frames(cut, geometry))
    assert err.value.path == str(cut)
    assert not sniff_cxi(text) and sniff_cxi(whole) and not sniff_cxi(tmp_path / "none.cxi")


def _results(frames, per_frame: list[int]) -> list[FrameResult]:
    results = []
    for frame, n in zip(frames, per_frame, strict=False):
        peaks = peaks_from_columns(panel=np.arange(n) % 2, fs=np.linspace(1.25, 30, n),
                                   ss=np.linspace(0.5, 14.75, n), intensity=np.arange(n) * 10.0,
                                   npix=np.full(n, 5), snr=np.full(n, 7.5),
                                   max_value=np.full(n, 99.0))
        results.append(FrameResult(frame=frame, peaks=peaks, hit=n > 2))
    return results


def test_frames_reached_through_an_external_link_are_linked_by_that_path(tmp_path, geometry):
    """A NeXus-style master whose data path is an external link to another file: the frames
    are read through it, and the CXI output links them through the same path (the linked
    dataset's own name, ``/data`` inside the other file, was looked up in the master: a
    KeyError traceback after the frames were found)."""
    data = make_stack(tmp_path / "data_000001.h5", n=3, dataset="/data")
    master = tmp_path / "master.h5"
    with h5py.File(master, "w") as h5:
        h5["/entry_1/data_1/data"] = h5py.ExternalLink("data_000001.h5", "/data")
    frames = list(iter_cxi_frames(master, geometry))
    assert [f.meta["h5_dataset"] for f in frames] == ["/entry_1/data_1/data"] * 3
    out = tmp_path / "peaks.cxi"
    assert write_cxi(out, _results(frames, [3, 0, 4]), geometry) == "vds"
    with h5py.File(out) as h5:
        assert h5[DATA_PATH].is_virtual
        np.testing.assert_array_equal(h5[DATA_PATH][()], data.astype(h5[DATA_PATH].dtype))


def test_write_vds_links_to_original_pixels_and_tables_read_back(tmp_path, geometry):
    src = tmp_path / "raw.cxi"
    data = make_stack(src, n=3)
    results = _results(list(iter_cxi_frames(src, geometry)), [3, 0, 6])
    out = tmp_path / "out" / "peaks.cxi"
    assert write_cxi(out, results, geometry, mode="auto") == "vds"
    with h5py.File(out, "r") as h5:
        ds = h5["/entry_1/data_1/data"]
        assert ds.is_virtual and ds.shape == (3, 32, 32)
        np.testing.assert_array_equal(ds[2], data[2])
        grp = h5["/entry_1/result_1"]
        assert grp["nPeaks"].dtype == np.int32 and list(grp["nPeaks"][()]) == [3, 0, 6]
        for name in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity", "peakNPixels",
                     "peakMaximumValue", "peakSNR", "peakPanel"):
            assert grp[name].dtype == np.float32 and grp[name].shape == (3, 2048)
        assert grp["peakOneOverD"].attrs["units"] == "1/angstrom"  # streams write nm^-1
    table = read_cxi_peaks(out)
    raw = table.raw(2)
    # bottom-panel peaks (odd rows) move down by the panel's min_ss = 16 in raw slab coordinates
    expect_ss = np.linspace(0.5, 14.75, 6) + np.array([0, 16, 0, 16, 0, 16])
    np.testing.assert_allclose(raw["peakYPosRaw"], expect_ss, rtol=1e-6)
    back = table.peaks(2, geometry)
    np.testing.assert_array_equal(back["panel"], [0, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(back["ss"], results[2].peaks["ss"], rtol=1e-6)
    np.testing.assert_allclose(back["intensity"], results[2].peaks["intensity"])
    assert table.keys == [(str(src), "//0"), (str(src), "//1"), (str(src), "//2")]


def test_a_peak_table_indexamajig_could_not_use_is_refused_naming_the_dataset(tmp_path,
                                                                             geometry):
    """A negative nPeaks (it was "negative dimensions are not allowed" deep in numpy), nPeaks
    past the columns' width and a column of another frame count each name the dataset."""
    src = tmp_path / "raw.cxi"
    make_stack(src, n=2)
    out = tmp_path / "peaks.cxi"
    write_cxi(out, _results(list(iter_cxi_frames(src, geometry)), [3, 1]), geometry)
    for name, value, message in (("nPeaks", np.array([3, -2], np.int32), "cannot be negative"),
                                 ("nPeaks", np.array([3, 5000], np.int32), "nPeaks reaches"),
                                 ("peakXPosRaw", np.zeros((3, 2048), np.float32),
                                  "does not match 2 frames")):
        broken = tmp_path / f"broken_{name}_{message[:4]}.cxi"
        broken.write_bytes(out.read_bytes())
        with h5py.File(broken, "a") as h5:
            del h5[f"/entry_1/result_1/{name}"]
            h5[f"/entry_1/result_1/{name}"] = value
        with pytest.raises(FormatError, match=message) as err:
            read_cxi_peaks(broken)
        assert str(broken) in str(err.value) and name in str(err.value)


def test_width_grows_in_blocks_and_copy_mode_stores_pixels(tmp_path, geometry):
    src = tmp_path / "raw.cxi"
    data = make_stack(src, n=2)
    results = _results(list(iter_cxi_frames(src, geometry)), [9, 2])
    out = tmp_path / "copy.cxi"
    assert write_cxi(out, results, geometry, mode="copy", max_peaks=4) == "copy"
    src.unlink()  # the copy must not depend on the original
    table = read_cxi_peaks(out)
    assert table.max_peaks == 12 and list(table.n_peaks) == [9, 2]
    frame = read_cxi_frame(out, 1, geometry)
    np.testing.assert_array_equal(frame.panels[0], data[1, :16])
    with h5py.File(out) as h5:  # filters every HDF5 library has (CrystFEL reads them)
        stored = h5[DATA_PATH]
        assert stored.shuffle and stored.compression == "gzip" and stored.chunks[0] == 1


def test_geometry_beside_cxi_reads_back_and_reopens_the_file(tmp_path, make_geometry_text):
    single = parse_geometry(make_geometry_text(**CXI_GEOMETRY, data="/img", dims=False))
    src = tmp_path / "single.h5"
    make_stack(src, n=0, shape=(32, 32), dataset="/img")
    frame = read_cxi_frame(src, geometry=single)
    out = tmp_path / "w.cxi"
    write_cxi(out, _results([frame], [4]), single)
    geom = write_cxi_geometry(out, single)
    assert geom == tmp_path / "w.geom"
    written = read_geometry(geom)
    assert (written.peak_list, written.peak_list_type) == ("/entry_1/result_1", "cxi")
    assert written.data == "/entry_1/data_1/data" and written.dims == ["%", "ss", "fs"]
    assert [p.dims for p in written.panels] == [["%", "ss", "fs"]] * 2
    again = read_cxi_frame(out, 0, written)
    assert again.event == "//0"
    for a, b in zip(again.panels, frame.panels, strict=False):
        np.testing.assert_array_equal(a, b)


def test_rolling_writer_resumes_and_leaves_nothing_half_written(tmp_path, geometry):
    src = tmp_path / "raw.cxi"
    make_stack(src, n=5)
    frames = list(iter_cxi_frames(src, geometry))
    results = _results(frames, [1, 2, 3, 4, 5])
    out = tmp_path / "run"
    writer = CXIWriter(out, geometry, frames_per_file=2)
    for r in results[:3]:
        writer.write(r)
    # "crash": the third frame is on disk only under a hidden temporary name; one finished
    # file and the one geometry all files share, nothing partial under a final name
    visible = [p.name for p in sorted(out.iterdir()) if not p.name.startswith(".")]
    assert visible == ["peaks-00000.cxi", "peaks.geom"]
    resumed = CXIWriter(out, geometry, frames_per_file=2)
    assert resumed.done_keys() == {f.key for f in frames[:2]}
    for r in results:
        if r.frame.key not in resumed.done_keys():
            resumed.write(r)
    resumed.close()
    names = sorted(p.name for p in out.glob("*.cxi"))
    assert names == ["peaks-00000.cxi", "peaks-00001.cxi", "peaks-00002.cxi"]
    assert CXIWriter(out, geometry).done_keys() == {f.key for f in frames}
    assert list(read_cxi_peaks(out / "peaks-00002.cxi").n_peaks) == [5]
    assert not list(out.glob(".*part"))


def test_failed_write_leaves_no_file(tmp_path, geometry):
    src = tmp_path / "raw.cxi"
    make_stack(src, n=1)
    results = _results(list(iter_cxi_frames(src, geometry)), [3])
    results[0].frame.geometry = None
    results[0].peaks["panel"] = 0  # the peaks fit, but the pixels cannot be laid into a slab
    out = tmp_path / "fail.cxi"
    with pytest.raises(ValueError, match="multi-panel frame .* needs a geometry"):
        write_cxi(out, results, None, mode="copy")  # two panels, no geometry to place them
    assert list(tmp_path.glob("fail*")) == [] and list(tmp_path.glob(".fail*")) == []


def test_source_protocol(tmp_path, geom_path):
    src = tmp_path / "raw.cxi"
    make_stack(src, n=3)
    source = CXISource(src, geometry=geom_path)
    assert source.name == "cxi" and len(source) == 3
    assert [f.serial for f in source] == [0, 1, 2]
    source.close()


@pytest.mark.parametrize("energies", [[9500.0, 9600.0, 9700.0], [9500.0]])
def test_photon_energy_named_by_the_geometry_is_read_per_frame(tmp_path, make_geometry_text,
                                                               energies):
    """``photon_energy = /LCLS/photon_energy_eV``: CrystFEL reads it per frame from the file;
    so do we, which fills 1/d and turns an ``adu_per_eV`` into the gain for the shot noise."""
    from peaknet_xtal.finding.settings import resolve_gain
    from peaknet_xtal.formats.geometry import HC_EV_A

    settings = dict(CXI_GEOMETRY, photon_energy="/LCLS/photon_energy_eV", adu_per_photon=None)
    text = "adu_per_eV = 0.003\n" + make_geometry_text(**settings)
    geometry = parse_geometry(text)
    path = tmp_path / "run.cxi"
    make_stack(path, n=3)
    with h5py.File(path, "a") as h5:
        h5["/LCLS/photon_energy_eV"] = np.array(energies) if len(energies) > 1 else energies[0]
    frames = list(iter_cxi_frames(path, geometry))
    expected = energies if len(energies) > 1 else energies * 3
    for frame, energy in zip(frames, expected, strict=False):
        assert frame.meta["wavelength_A"] == pytest.approx(HC_EV_A / energy)
        assert resolve_gain(meta=frame.meta, geometry=frame.geometry) == pytest.approx(
            0.003 * energy)
    for bad, message in ((-1.0, "not positive"), ([9500.0, 9600.0], "2 photon energies")):
        with h5py.File(path, "a") as h5:
            del h5["/LCLS/photon_energy_eV"]
            h5["/LCLS/photon_energy_eV"] = bad
        with pytest.raises(FormatError, match=message) as err:
            list(iter_cxi_frames(path, geometry))
        assert str(path) in str(err.value)


def test_flags_mask_pixels_and_masks_travel_into_the_cxi_output(tmp_path, make_geometry_text):
    """flag_lessthan/flag_morethan/flag_equal mask pixels by value (strictly, as CrystFEL);
    the written CXI file holds every frame's mask and photon energy, also for frames that reach
    the writer without pixels (the Ray pipeline sends linked frames so)."""
    import dataclasses

    text = ("flag_lessthan = 0\nflag_morethan = 990\nflag_equal = 500\n"
            + make_geometry_text(**CXI_GEOMETRY))
    geometry = parse_geometry(text)
    src = tmp_path / "raw.cxi"
    data = make_stack(src, n=2)
    with h5py.File(src, "a") as h5:
        mask = np.ones((32, 32), np.uint8)
        mask[3, 4] = 0
        h5["/entry_1/data_1/mask"] = mask
    frames = list(iter_cxi_frames(src, geometry))
    slab = data[1]
    expected = (slab >= 0) & (slab <= 990) & (slab != 500) & (mask != 0)
    expected[16:18, 0:2] = False  # the geometry's bad region
    got = geometry.assemble_slab(frames[1].masks, fill=False)
    np.testing.assert_array_equal(got, expected)
    assert (~expected).sum() > 10  # the flags really masked something
    out = tmp_path / "out"
    writer = CXIWriter(out, geometry)
    writer.write(_results([frames[0]], [2])[0])
    slim = dataclasses.replace(frames[1], panels=[], masks=None)  # as the pipeline sends it
    writer.write(_results([slim], [1])[0])
    writer.close()
    (written,) = writer.finished_files()
    with h5py.File(written, "r") as h5:
        stored = h5["/entry_1/data_1/mask"][()]
        energy = h5["/entry_1/peaknet/photon_energy_eV"][()]
    np.testing.assert_array_equal(stored[1].astype(bool), expected)
    np.testing.assert_allclose(energy, [9500.0, 9500.0])
    again = read_cxi_frame(written, 1, read_geometry(out / "peaks.geom"))
    np.testing.assert_array_equal(geometry.assemble_slab(again.masks, fill=False), expected)


@pytest.mark.parametrize("style", ["top-level", "per-panel"])
def test_camera_length_named_by_the_geometry_travels_per_frame(tmp_path, make_geometry_text,
                                                               style):
    """``clen = /LCLS/detectorEncoderValue`` (or, 0.9-style, the same path on every panel): the
    CXI output holds each frame's value, and its geometry reads it from there with the unit
    CrystFEL gives a path without one (mm), since indexamajig opens only the CXI file."""
    from peaknet_xtal.formats.cxi import CLEN_PATH
    from peaknet_xtal.formats.geometry_rules import crystfel_problems

    text = make_geometry_text(**dict(CXI_GEOMETRY, clen="/LCLS/detectorEncoderValue"))
    if style == "per-panel":
        text = "".join(line + "\n" for line in text.splitlines() if not line.startswith("clen"))
        text += "".join(f"{name}/clen = /LCLS/detectorEncoderValue\n"
                        for name in CXI_GEOMETRY["names"])
    geometry = parse_geometry(text)
    assert geometry.camera_length_path == "/LCLS/detectorEncoderValue"
    src = tmp_path / "raw.cxi"
    make_stack(src, n=3)
    lengths = [101.5, 102.0, 99.25]
    with h5py.File(src, "a") as h5:
        h5["/LCLS/detectorEncoderValue"] = np.array(lengths)
    out = tmp_path / "peaks.cxi"
    write_cxi(out, _results(list(iter_cxi_frames(src, geometry)), [3, 0, 4]), geometry)
    geom = write_cxi_geometry(out, geometry)
    with h5py.File(out) as h5:
        np.testing.assert_array_equal(h5[CLEN_PATH][()], lengths)
    written = geom.read_text()
    assert f"clen = {CLEN_PATH} mm" in written.splitlines()
    assert crystfel_problems(written, [out]) == []


def test_a_detector_shift_read_from_the_data_file_travels_per_frame(tmp_path,
                                                                    make_geometry_text):
    """``detector_shift_y = /LCLS/shift_y mm`` (crystfel_geometry(5): the shift may be a file
    metadata location): the ``.geom`` kept the input's location, which the CXI files do not
    hold, so indexamajig could load no frame.  Each frame's value is now copied beside its peaks
    and the geometry reads it there, with the line's unit; a numeric shift is kept as it is."""
    from peaknet_xtal.formats.geometry_rules import crystfel_problems

    text = make_geometry_text(**CXI_GEOMETRY)
    text = "detector_shift_x = 1.5 mm\ndetector_shift_y = /LCLS/shift_y mm\n" + text
    geometry = parse_geometry(text)
    src = tmp_path / "raw.cxi"
    make_stack(src, n=3)
    shifts = [0.25, -0.5, 0.75]
    with h5py.File(src, "a") as h5:
        h5["/LCLS/shift_y"] = np.array(shifts)
    out = tmp_path / "peaks.cxi"
    write_cxi(out, _results(list(iter_cxi_frames(src, geometry)), [3, 0, 4]), geometry)
    written = write_cxi_geometry(out, geometry).read_text()
    lines = written.splitlines()
    assert "detector_shift_x = 1.5 mm" in lines
    assert "detector_shift_y = /entry_1/peaknet/detector_shift_y mm" in lines
    with h5py.File(out) as h5:
        np.testing.assert_array_equal(h5["/entry_1/peaknet/detector_shift_y"][()], shifts)
        assert "/entry_1/peaknet/detector_shift_x" not in h5
    assert crystfel_problems(written, [out]) == []


def test_a_saturation_map_that_is_not_carried_over_is_said(tmp_path, make_geometry_text,
                                                           caplog):
    """The CXI files hold no saturation map, so the ``.geom`` cannot name one: the writer says
    so once, naming the line, where it was dropped in silence."""
    from peaknet_xtal.formats.cxi import CXIWriter

    text = "saturation_map = /entry_1/satmap\n" + make_geometry_text(**CXI_GEOMETRY)
    geometry = parse_geometry(text)
    src = tmp_path / "raw.cxi"
    make_stack(src, n=2)
    with caplog.at_level("WARNING", logger="peaknet_xtal.formats.cxi"):
        with CXIWriter(tmp_path / "out", geometry) as writer:
            for result in _results(list(iter_cxi_frames(src, geometry)), [3, 0]):
                writer.write(result)
    said = [r.getMessage() for r in caplog.records if "saturation map" in r.getMessage()]
    assert len(said) == 1 and "saturation_map = /entry_1/satmap" in said[0], said
    assert "saturation_map" not in (tmp_path / "out" / "peaks.geom").read_text()


def test_stream_chunks_say_each_frames_camera_length_with_coffset(tmp_path, make_geometry_text):
    """``average_camera_length`` is CrystFEL's mean over panels of clen + coffset: it was the
    clen alone (-0.473 m for CrystFEL's CSPAD example, coffset 0.573 m), and missing where the
    geometry reads clen from the data file, which CrystFEL writes for every chunk."""
    from peaknet_xtal.formats.stream import chunk_from_peak_table
    from peaknet_xtal.types import empty_peaks

    numeric = parse_geometry(make_geometry_text(**dict(CXI_GEOMETRY, clen="-0.473224 m"))
                             .replace("res = ", "coffset = 0.573224\nres = "))
    chunk = chunk_from_peak_table(empty_peaks(0), numeric, filename="x.cxi")
    assert chunk.camera_length_m == pytest.approx(0.1, abs=1e-9)
    geometry = parse_geometry(make_geometry_text(**dict(CXI_GEOMETRY,
                                                        clen="/LCLS/detectorEncoderValue"))
                              .replace("res = ", "coffset = 0.002\nres = "))
    src = tmp_path / "raw.cxi"
    make_stack(src, n=2)
    with h5py.File(src, "a") as h5:
        h5["/LCLS/detectorEncoderValue"] = np.array([101.5, 99.25])  # mm, CrystFEL's default
    results = _results(list(iter_cxi_frames(src, geometry)), [1, 2])
    lengths = [r.stream_chunk(geometry).camera_length_m for r in results]
    assert lengths == pytest.approx([0.1035, 0.10125], abs=1e-9)


def test_camera_length_from_the_data_file_is_read_once_with_the_frame(tmp_path,
                                                                     make_geometry_text):
    """The reader reads a frame's camera length with its pixels, so that the engine's 1/d, the
    stream chunk and the CXI writer do not each open the file again (three opens a frame for
    CrystFEL's CSPAD geometry); with the file gone, every one of them still has the value, and
    a frame made without it (another reader) reads the file, placeholders included."""
    import shutil

    from peaknet_xtal.finding.peaks import frame_clen_m

    geometry = parse_geometry(make_geometry_text(**dict(CXI_GEOMETRY,
                                                        clen="/LCLS/detectorEncoderValue")))
    src = tmp_path / "raw.cxi"
    make_stack(src, n=2)
    with h5py.File(src, "a") as h5:
        h5["/LCLS/detectorEncoderValue"] = np.array([101.5, 99.25])
    frames = list(iter_cxi_frames(src, geometry))
    shutil.move(src, tmp_path / "moved.cxi")
    assert [frame_clen_m(f) for f in frames] == pytest.approx([0.1015, 0.09925])
    assert [r.stream_chunk(geometry).camera_length_m
            for r in _results(frames, [1, 0])] == pytest.approx([0.1015, 0.09925])
    shutil.move(tmp_path / "moved.cxi", src)
    for frame in frames:
        del frame.meta["header_read"]
    assert [frame_clen_m(f) for f in frames] == pytest.approx([0.1015, 0.09925])
    events = _event_geometry(make_geometry_text)
    _event_file(tmp_path / "run.h5", [12, 3])
    tagged = list(iter_cxi_frames(tmp_path / "run.h5", events))
    read = [frame_clen_m(f) for f in tagged]
    for frame in tagged:
        del frame.meta["header_read"]
    assert read == [frame_clen_m(f) for f in tagged] == pytest.approx([0.112, 0.103])


STACKED = """\
photon_energy = 9300 eV
clen = 0.2 m
res = 5000
adu_per_photon = 1
data = /entry_1/data_1/data
dim0 = %
dim2 = ss
dim3 = fs
"""


def _stacked_geometry():
    """Two 8 x 12 modules along a fixed dimension (EuXFEL-style ``mN/dim1 = N``), each of two
    4-row panels, with a bad region on module 1: every panel's fs/ss range is shared."""
    text = STACKED
    for m in range(2):
        for a in range(2):
            n = f"m{m}a{a}"
            text += (f"{n}/dim1 = {m}\n{n}/min_fs = 0\n{n}/max_fs = 11\n{n}/min_ss = {4 * a}\n"
                     f"{n}/max_ss = {4 * a + 3}\n{n}/fs = +1.0x\n{n}/ss = +1.0y\n"
                     f"{n}/corner_x = {-6 + 20 * m}\n{n}/corner_y = {4 * a}\n")
    text += ("bad_m1/min_fs = 2\nbad_m1/max_fs = 3\nbad_m1/min_ss = 5\nbad_m1/max_ss = 6\n"
             "bad_m1/panel = m1a1\n")
    return parse_geometry(text)


@pytest.mark.parametrize("mode", ["vds", "copy"])
def test_stacked_modules_are_stored_as_one_slab_crystfel_can_place_peaks_on(tmp_path, mode):
    """CrystFEL finds a CXI peak's panel from its slab position alone, so modules stacked along
    a fixed dimension (all sharing fs/ss 0-11, 0-7) would make every peak ambiguous: the output
    holds them one below another, with a geometry that says so, and reads back the same."""
    from peaknet_xtal.formats.geometry_rules import crystfel_problems

    geometry = _stacked_geometry()
    assert geometry.stacked and geometry.slab_shape == (2, 8, 12)
    src = tmp_path / "raw.cxi"
    data = np.random.default_rng(3).integers(0, 500, (3, 2, 8, 12)).astype(np.int32)
    with h5py.File(src, "w") as h5:
        h5["/entry_1/data_1/data"] = data
    frames = list(iter_cxi_frames(src, geometry))
    peaks = peaks_from_columns(panel=[0, 3, 2], fs=[1.0, 5.5, 11.0], ss=[2.0, 0.25, 3.0],
                               intensity=[10.0, 20.0, 30.0], npix=[3, 3, 3], snr=[5.0, 5.0, 5.0],
                               max_value=[9.0, 9.0, 9.0])
    results = [FrameResult(frame=f, peaks=peaks, hit=True) for f in frames]
    out = tmp_path / "peaks.cxi"
    assert write_cxi(out, results, geometry, mode=mode) == mode
    text = write_cxi_geometry(out, geometry).read_text()
    written = parse_geometry(text)
    assert not written.stacked and written.slab_shape == (16, 12)
    with h5py.File(out) as h5:
        stored = h5[DATA_PATH]
        assert stored.shape == (3, 16, 12)
        np.testing.assert_array_equal(stored[1], np.concatenate([data[1, 0], data[1, 1]]))
        mask = h5["/entry_1/data_1/mask"][1]
        assert mask.shape == (16, 12) and mask[8 + 5:8 + 7, 2:4].sum() == 0 and mask.sum() == 188
    table = read_cxi_peaks(out)
    np.testing.assert_allclose(table.raw(0)["peakYPosRaw"], [2.0, 8 + 4 + 0.25, 8 + 3.0])
    back = table.peaks(0, written)
    np.testing.assert_array_equal(back["panel"], peaks["panel"])
    np.testing.assert_allclose(back["ss"], peaks["ss"])
    again = read_cxi_frame(out, 2, written)
    for a, b in zip(again.panels, frames[2].panels, strict=True):
        np.testing.assert_array_equal(a, b)
    assert crystfel_problems(text, [out]) == []


def test_geometry_gets_the_gain_measured_from_the_data(tmp_path, geometry):
    """A gain the finder measured (the input declared a placeholder) goes into the written
    geometry, where indexamajig and peaknet-integrate read it; a resumed run that measures a
    slightly different one keeps the folder's geometry, but a user's other gain is refused."""
    src = tmp_path / "raw.cxi"
    make_stack(src, n=3)
    results = _results(list(iter_cxi_frames(src, geometry)), [3, 1, 2])
    for result in results:
        result.meta.update(adu_per_photon=27.9, gain_measured=True)
    results[1].meta["adu_per_photon"] = 30.3  # the run's pooled value by its second frame
    with CXIWriter(tmp_path / "out", geometry, frames_per_file=2, geometry_name="p.geom") as w:
        w.write(results[0])
        assert {p.adu_per_photon for p in read_geometry(
            tmp_path / "out" / "p.geom").panels} == {27.9}  # provisional: the first frame's
        w.write(results[1])
    written = read_geometry(tmp_path / "out" / "p.geom")
    assert {p.adu_per_photon for p in written.panels} == {30.3}  # as the first file is done
    results[2].meta["adu_per_photon"] = 28.4  # the resumed run's own measurement
    with CXIWriter(tmp_path / "out", geometry, geometry_name="p.geom") as w:
        w.write(results[2])
    assert {p.adu_per_photon for p in read_geometry(tmp_path / "out" / "p.geom").panels} == {30.3}
    with pytest.raises(FormatError, match="its detector geometry differs from the one in .*p.geom"):
        with CXIWriter(tmp_path / "out", geometry, geometry_name="p.geom",
                       adu_per_photon=10.0) as w:
            w.write(results[2])


@pytest.mark.parametrize("stored", [np.uint16, np.float64, np.float32])
@pytest.mark.parametrize("pixels", [True, False])
def test_stored_mask_leaves_out_the_pixels_the_finder_left_out(tmp_path, geometry, pixels,
                                                               stored):
    """65535 in uint16 frames marks module gaps: the finder masks it where frames enter it, and
    the CXI mask says so too (indexamajig and peaknet-integrate read that mask), whether the
    frame arrives with its pixels or, as the Ray pipeline sends linked frames, without.  The
    same counts stored as floats mark the same gaps, as the Python API and the DIALS plugin read
    whole-number floats (a float64 copy of an Eiger stack had 480 false peaks a frame in its
    gaps through peaknet2cxi alone)."""
    from dataclasses import replace

    src = tmp_path / "raw.h5"
    data = np.random.default_rng(2).integers(0, 900, (2, 32, 32)).astype(stored)
    data[:, 10, :] = 65535  # a gap row
    with h5py.File(src, "w") as h5:
        h5["/entry_1/data_1/data"] = data
    frames = list(iter_cxi_frames(src, geometry))
    if not pixels:
        frames = [replace(f, panels=[], masks=None) for f in frames]
    out = tmp_path / "peaks.cxi"
    write_cxi(out, _results(frames, [1, 2]), geometry, mode="vds")
    with h5py.File(out) as h5:
        mask = h5["/entry_1/data_1/mask"][1]
    assert not mask[10].any() and mask[11].all()
    assert mask.sum() == 32 * 32 - 32 - 4  # the gap row and the geometry's 2x2 bad corner


def test_float_frames_that_are_not_whole_counts_mark_nothing(tmp_path, geometry):
    """Float data with fractions (calibrated, pedestal-corrected) carry no marks: their largest
    value is a pixel like any other."""
    from peaknet_xtal.finding.sanitise import sanitise_frame

    src = tmp_path / "raw.h5"
    data = np.random.default_rng(2).uniform(0, 900, (1, 32, 32))
    data[0, 10, :] = 65535.0
    with h5py.File(src, "w") as h5:
        h5["/entry_1/data_1/data"] = data
    frame = next(iter_cxi_frames(src, geometry))
    assert frame.meta["dtype"] == "float64"
    _, goods, _ = sanitise_frame(frame.panels, frame.masks, frame.meta["dtype"])
    assert sum(int(g.sum()) for g in goods) == 32 * 32 - 4  # only the geometry's bad corner


#: CXI_GEOMETRY with the bottom panel's corner 2 pixels lower: the same panel shapes, placed
#: otherwise (the frames of both fit one file; their peaks do not fit one geometry)
SHIFTED_GEOMETRY = {**CXI_GEOMETRY, "corners": [(-16.0, 2.0), (-16.0, -20.0)]}


def _two_inputs(tmp_path: Path, make_geometry_text, second: dict) -> tuple[list[FrameResult],
                                                                        np.ndarray]:
    """Two frames of ``near.h5`` (CXI_GEOMETRY) and one of ``other.h5`` (``second``), each
    frame carrying its input's geometry, as frames reach the Ray pipeline's writer; and the
    first input's pixels."""
    data = make_stack(tmp_path / "near.h5", n=2)
    make_stack(tmp_path / "other.h5", n=1)
    near = parse_geometry(make_geometry_text(**CXI_GEOMETRY))
    other = parse_geometry(make_geometry_text(**second))
    frames = [*iter_cxi_frames(tmp_path / "near.h5", near),
              *iter_cxi_frames(tmp_path / "other.h5", other)]
    return _results(frames, [3, 2, 4]), data


@pytest.mark.parametrize("mode", ["vds", "copy"])
def test_writer_refuses_a_frame_placed_otherwise_before_writing_any_of_it(
        tmp_path, make_geometry_text, mode):
    """A frame of the same panel shapes as the folder's but placed otherwise would share its
    file and its one geometry, and be indexed with the wrong one: the writer refuses it, naming
    its file, the input the folder's geometry came from and what to do, before writing any of
    it; the file in progress keeps its frames whole and takes more of the folder's."""
    results, data = _two_inputs(tmp_path, make_geometry_text, SHIFTED_GEOMETRY)
    first, second = tmp_path / "near.h5", tmp_path / "other.h5"
    out = tmp_path / "out"
    writer = CXIWriter(out, mode=mode, geometry_name="p.geom")  # no geometry: the frames'
    writer.write(results[0])
    with pytest.raises(FormatError) as info:
        writer.write(results[2])
    message = str(info.value)
    assert message.startswith(f"{second}: its detector geometry differs from that of the "
                              f"first input, {first}; ")
    assert "its own output folder" in message
    writer.write(results[1])
    writer.close()
    (done,) = writer.files
    table = read_cxi_peaks(done)
    assert table.keys == [(str(first), "//0"), (str(first), "//1")]
    written = read_geometry(out / "p.geom")
    assert [p.corner_y for p in written.panels] == [2.0, -18.0]
    back = table.peaks(0, written)
    np.testing.assert_array_equal(back["panel"], results[0].peaks["panel"])
    np.testing.assert_allclose(back["ss"], results[0].peaks["ss"], rtol=1e-6)
    frame = read_cxi_frame(done, 0, written)
    np.testing.assert_array_equal(frame.panels[1], data[0, 16:])


def test_writer_refuses_another_geometry_than_an_earlier_runs(tmp_path, make_geometry_text):
    """The ``.geom`` an earlier run left in the folder is the folder's geometry (its files are
    indexed with it): a frame placed otherwise is refused naming that file, and so is another
    geometry the writer is given for every frame (named by its own file); the folder is left
    as it was."""
    results, _ = _two_inputs(tmp_path, make_geometry_text, SHIFTED_GEOMETRY)
    out = tmp_path / "out"
    with CXIWriter(out, geometry_name="p.geom") as writer:
        writer.write(results[0])
    before = (out / "p.geom").read_text()
    with pytest.raises(FormatError) as info:
        with CXIWriter(out, geometry_name="p.geom") as writer:
            writer.write(results[2])
    assert str(info.value).startswith(f"{tmp_path / 'other.h5'}: its detector geometry differs "
                                      f"from {out / 'p.geom'}, written by an earlier run; ")
    given = tmp_path / "shifted.geom"
    given.write_text(make_geometry_text(**SHIFTED_GEOMETRY))
    with pytest.raises(FormatError) as info:
        with CXIWriter(out, given, geometry_name="p.geom") as writer:
            writer.write(results[1])
    assert str(info.value).startswith(f"{given}: this geometry (-g) differs from the one in "
                                      f"{out / 'p.geom'}")
    assert (out / "p.geom").read_text() == before
    assert [p.name for p in out.glob("*.cxi")] == ["peaks-00000.cxi"]
    assert read_cxi_peaks(out / "peaks-00000.cxi").keys == [results[0].frame.key]


@pytest.mark.parametrize("second", [CXI_GEOMETRY, {**CXI_GEOMETRY, "adu_per_photon": "31"}],
                         ids=["same", "gain-only"])
def test_writer_takes_frames_of_one_placement_into_one_file(tmp_path, make_geometry_text,
                                                            second):
    """The same geometry read again (another object), or one that differs only in its gain
    (which the writer measures from the data where none is declared), places the pixels the
    same: one folder, one file."""
    results, _ = _two_inputs(tmp_path, make_geometry_text, second)
    with CXIWriter(tmp_path / "out", geometry_name="p.geom") as writer:
        for result in results:
            writer.write(result)
    (done,) = writer.files
    assert read_cxi_peaks(done).keys == [r.frame.key for r in results]


def _settings_file(path: Path, settings: dict | None) -> Path:
    from peaknet_xtal.formats.cxi import SETTINGS_ATTR

    with h5py.File(path, "w") as h5:
        h5.attrs["creator"] = "peaknet-xtal"
        if settings is not None:
            h5.attrs[SETTINGS_ATTR] = json.dumps(settings)
    return path


def test_a_folder_keeps_one_runs_settings(tmp_path):
    """check_same_settings: the latest finished file decides; every differing setting is
    named with both values; what one side does not record, or an older file without any
    record, is not judged; equal weights digests make the model's name irrelevant."""
    from peaknet_xtal.formats.cxi import SETTINGS_ATTR, check_same_settings, read_settings

    earlier = {"model": "default", "model_sha256": "a" * 64, "threshold": 0.5, "min_snr": 3.0}
    old = _settings_file(tmp_path / "peaks-00000.cxi", None)
    latest = _settings_file(tmp_path / "peaks-00001.cxi", earlier)
    assert read_settings(old) is None and read_settings(latest) == earlier
    check_same_settings([old, latest], dict(earlier))
    check_same_settings([old, latest], {**earlier, "model": "/x/default.safetensors"})
    check_same_settings([old, latest], {**earlier, "faint_support": 3})  # not recorded there
    check_same_settings([old], {**earlier, "threshold": 0.9})  # an older run's: not judged
    check_same_settings([], earlier)
    with pytest.raises(FormatError) as caught:
        check_same_settings([old, latest], {**earlier, "threshold": 0.9, "min_snr": 4.0})
    assert caught.value.path == str(latest)
    assert "min_snr 3.0 there, 4.0 now; threshold 0.5 there, 0.9 now" in str(caught.value)
    with pytest.raises(FormatError, match="model 'default' there, '/x/m.safetensors' now"):
        check_same_settings([latest], {**earlier, "model": "/x/m.safetensors",
                                       "model_sha256": "b" * 64})
    # every file is judged, not only the latest: a damaged or foreign one among them too
    middle = _settings_file(tmp_path / "peaks-00002.cxi", {**earlier, "threshold": 0.9})
    with pytest.raises(FormatError, match="threshold 0.9 there, 0.5 now") as caught:
        check_same_settings([old, latest, middle, latest], earlier)
    assert caught.value.path == str(middle)
    bare = _settings_file(tmp_path / "peaks-00003.cxi", None)
    with pytest.raises(FormatError, match="records no finding settings, though the files "
                                          "before it do") as caught:
        check_same_settings([old, latest, bare], earlier)
    assert caught.value.path == str(bare)
    listed = _settings_file(tmp_path / "peaks-00004.cxi", None)
    with h5py.File(listed, "a") as h5:
        h5.attrs[SETTINGS_ATTR] = "[]"
    with pytest.raises(FormatError, match="not a record of settings \\(a JSON list\\)"):
        check_same_settings([listed], earlier)
    with pytest.raises(FormatError, match="not JSON"):
        from peaknet_xtal.formats.cxi import SETTINGS_ATTR

        with h5py.File(latest, "a") as h5:
            h5.attrs[SETTINGS_ATTR] = "{broken"
        read_settings(latest)


# ---- CrystFEL's path placeholders: one group per event (``data = /%/data``) ------------------

#: Per-event data, mask and beam values, as SACLA-style files hold them (each '%' a group name).
EVENT_KEYS = ("photon_energy = /%/photon_energy_eV\nclen = /%/clen mm\nmask = /%/mask\n"
              "mask_good = 0x1\nmask_bad = 0x0\n")


def _event_geometry(make_geometry_text, *, data: str = "/%/data", stacked: bool = False):
    """CXI_GEOMETRY reading each event's frame (a stack with ``stacked``) from ``data``."""
    settings = dict(CXI_GEOMETRY, photon_energy=None, clen=None, data=data, dims=stacked)
    text = make_geometry_text(**settings)
    text = "\n".join(line for line in text.splitlines()
                     if not line.startswith(("photon_energy", "clen")))
    return parse_geometry(EVENT_KEYS + text + "\n")


def _event_file(path: Path, tags: list[int], *, frames: int = 0) -> dict[int, np.ndarray]:
    """Groups ``tag_N`` written in the given (unsorted) order, each with its pixels (a stack of
    ``frames`` with frames > 0), a mask with one bad pixel at row N, an energy and a camera
    length; beside them a dataset and a group that no event path matches."""
    rng = np.random.default_rng(3)
    pixels = {}
    with h5py.File(path, "w") as h5:
        h5["/file_info"] = 7  # a dataset where the placeholder looks for groups
        h5.create_group("/tag_99_empty")  # a group without data: no event
        for tag in tags:
            shape = (frames, 32, 32) if frames else (32, 32)
            pixels[tag] = rng.integers(0, 1000, size=shape).astype(np.uint16)
            h5[f"/tag_{tag}/data"] = pixels[tag]
            mask = np.ones((32, 32), np.uint8)
            mask[tag, 5] = 0
            h5[f"/tag_{tag}/mask"] = mask
            h5[f"/tag_{tag}/photon_energy_eV"] = 9000.0 + tag
            h5[f"/tag_{tag}/clen"] = 100.0 + tag
    return pixels


def test_path_placeholders_read_one_event_per_group_in_crystfels_order(tmp_path,
                                                                       make_geometry_text):
    """``data = /%/data`` (crystfel_geometry(5), "PANEL DATA LOCATIONS"): each group holding the
    rest of the path is one event, in name order, named as CrystFEL names it (``tag_3//``); the
    event's mask and beam values come from the same group (``mask = /%/mask``)."""
    from peaknet_xtal.formats.geometry import HC_EV_A

    geometry = _event_geometry(make_geometry_text)
    path = tmp_path / "run.h5"
    pixels = _event_file(path, [12, 3, 7])
    info = inspect_cxi(path, geometry)
    assert info.n_frames == 3 and info.events == ("tag_12//", "tag_3//", "tag_7//")
    frames = list(iter_cxi_frames(path, geometry))
    for frame, tag in zip(frames, [12, 3, 7], strict=True):
        assert frame.event == f"tag_{tag}//" and frame.meta["h5_dataset"] == f"/tag_{tag}/data"
        np.testing.assert_array_equal(geometry.assemble_slab(frame.panels), pixels[tag])
        bad = ~geometry.assemble_slab(frame.masks, fill=True)
        assert bad[tag, 5] and bad.sum() == 1 + 4  # its own bad pixel and the bad region
        assert frame.meta["wavelength_A"] == pytest.approx(HC_EV_A / (9000.0 + tag))
    source = CXISource(path, geometry)
    try:
        again = source.frame_at("tag_3//")
        np.testing.assert_array_equal(geometry.assemble_slab(again.panels), pixels[3])
        with pytest.raises(FormatError, match="no event '//1'") as err:
            source.frame_at("//1")
        assert str(path) in str(err.value)
    finally:
        source.close()


def test_path_placeholders_with_stacks_and_what_is_refused(tmp_path, make_geometry_text):
    """A placeholder group may hold a stack (``dim0 = %``): its frames are ``tag_3//0`` ...;
    events of different shapes, a placeholder inside a path component (CrystFEL finds no event
    there) and a pattern nothing matches are refused naming the file."""
    geometry = _event_geometry(make_geometry_text, stacked=True)
    path = tmp_path / "stacks.h5"
    pixels = _event_file(path, [4, 2], frames=2)
    stack_masks = {}
    with h5py.File(path, "a") as h5:  # per-frame masks of a stack are read per frame
        del h5["/tag_2/mask"]
        stack_masks[2] = np.ones((2, 32, 32), np.uint8)
        stack_masks[2][1, 9, 9] = 0
        h5["/tag_2/mask"] = stack_masks[2]
    frames = list(iter_cxi_frames(path, geometry))
    assert [f.event for f in frames] == ["tag_2//0", "tag_2//1", "tag_4//0", "tag_4//1"]
    np.testing.assert_array_equal(geometry.assemble_slab(frames[3].panels), pixels[4][1])
    assert frames[3].meta["h5_index"] == 1 and frames[3].meta["h5_frame"] == 3
    assert not geometry.assemble_slab(frames[1].masks, fill=True)[9, 9]
    assert geometry.assemble_slab(frames[0].masks, fill=True)[9, 9]
    with h5py.File(path, "a") as h5:
        h5["/tag_5/data"] = np.zeros((2, 40, 32), np.uint16)
    with pytest.raises(FormatError, match="must share a frame shape") as err:
        inspect_cxi(path, geometry)
    assert str(path) in str(err.value)
    for pattern, message in (("/tag_%/data", "part of a path component"),
                             ("/%/image", "no dataset matches")):
        with pytest.raises(FormatError, match=message):
            inspect_cxi(path, _event_geometry(make_geometry_text, data=pattern, stacked=True))


@pytest.mark.parametrize("mode", ["vds", "copy"])
def test_events_of_path_placeholders_travel_into_the_cxi_output(tmp_path, make_geometry_text,
                                                                mode):
    """The written CXI file is a plain ``dim0 = %`` stack indexamajig reads: each event's pixels
    (linked to its own dataset, or copied), mask, photon energy and camera length, the event
    ids kept; also for frames that reach the writer without pixels (as Ray sends them)."""
    import dataclasses

    from peaknet_xtal.formats.cxi import CLEN_PATH, PHOTON_ENERGY_PATH

    geometry = _event_geometry(make_geometry_text)
    src = tmp_path / "run.h5"
    pixels = _event_file(src, [6, 1])
    frames = list(iter_cxi_frames(src, geometry))
    if mode == "vds":
        frames[1] = dataclasses.replace(frames[1], panels=[], masks=None)
    out = tmp_path / "peaks.cxi"
    assert write_cxi(out, _results(frames, [2, 3]), geometry, mode=mode) == mode
    with h5py.File(out, "r") as h5:
        assert h5[DATA_PATH].is_virtual == (mode == "vds")
        np.testing.assert_array_equal(h5[DATA_PATH][0], pixels[1])
        np.testing.assert_array_equal(h5[DATA_PATH][1], pixels[6])
        mask = h5["/entry_1/data_1/mask"][()]
        assert not mask[0, 1, 5] and not mask[1, 6, 5] and mask[0, 6, 5] and mask[1, 1, 5]
        np.testing.assert_array_equal(h5[PHOTON_ENERGY_PATH][()], [9001.0, 9006.0])
        np.testing.assert_array_equal(h5[CLEN_PATH][()], [101.0, 106.0])
        assert list(h5["/entry_1/peaknet/event"].asstr()[()]) == ["tag_1//", "tag_6//"]
