"""Every DIALS-readable image in the shared real data, through Debian's dxtbx."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_xtal.errors import FormatError

pytestmark = pytest.mark.dials

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
#: (relative path, panels, shape of panel 0) for every image under ../shared/data/real
IMAGES = (
    [(f"cspad_thermolysin_stills/{n}", 64, (185, 194))
     for n in ("idx-20130301060858401.cbf", "idx-20130301060858601.cbf")]
    + [(f"pilatus6m_thaumatin_grid/thau_3_2_{i:04d}.cbf.bz2", 1, (2527, 2463))
       for i in range(1, 11)]
    + [("synchrotron_single_images/DLS_I03_smargon_0001.cbf.gz", 1, (2527, 2463)),
       ("synchrotron_single_images/DLS_I23_P12M_thau_00001.cbf.gz", 24, (195, 2463)),
       ("synchrotron_single_images/dlsnxs2cbf_therm_0001.cbf.gz", 1, (4362, 4148))]
    + [(f"pilatus2m_lcysteine_rotation/l-cyst_01_{i:05d}.cbf.bz2", 1, (1679, 1475))
       for i in range(1, 11)]
    + [(f"pilatus2m_lcysteine_rotation/l-cyst_{s:02d}_00001.cbf.bz2", 1, (1679, 1475))
       for s in (2, 3, 4)]
)


def test_the_list_covers_every_shared_image(real_data):
    on_disk = {str(p.relative_to(real_data)) for p in real_data.rglob("*.cbf*")}
    assert on_disk == {rel for rel, _, _ in IMAGES}


@pytest.mark.parametrize("rel,n_panels,shape0", IMAGES,
                         ids=[r.split("/")[-1] for r, _, _ in IMAGES])
def test_every_real_image_reads_with_masks_and_geometry(real_data, dials_env, rel, n_panels,
                                                        shape0):
    from peaknet_xtal.formats.dxtbx_images import read_dxtbx_image

    frame = read_dxtbx_image(real_data / rel)
    assert len(frame.panels) == len(frame.masks) == n_panels
    assert frame.panels[0].shape == shape0 and frame.panels[0].dtype == np.float32
    pairs = list(zip(frame.panels, frame.masks, strict=True))
    assert all(m.shape == p.shape and m.dtype == bool for p, m in pairs)
    good = np.concatenate([p[m] for p, m in zip(frame.panels, frame.masks, strict=False)])
    assert good.size > 0.5 * sum(p.size for p in frame.panels)  # masks are not all-bad
    assert np.isfinite(good).all() and good.max() > 0
    assert frame.event == "//" and frame.source == str(real_data / rel)
    summary = frame.meta["panels"]
    assert len(summary) == n_panels and summary[0]["shape"] == list(shape0)
    assert 0.5 < summary[0]["wavelength_A"] < 3.0
    geometry = frame.geometry
    assert geometry.n_panels == n_panels and [p.shape for p in geometry.panels][0] == shape0
    # the CrystFEL geometry round-trips the pixels: slab -> panels gives back the same arrays
    slab = geometry.assemble_slab(frame.panels)
    np.testing.assert_array_equal(geometry.split_slab(slab)[-1], frame.panels[-1])


@pytest.mark.parametrize("rel", ["cspad_thermolysin_stills/idx-20130301060858401.cbf",
                                 "synchrotron_single_images/DLS_I23_P12M_thau_00001.cbf.gz"])
def test_crystfel_geometry_places_pixels_where_dxtbx_does(real_data, dials_env, rel):
    """Lab positions (to 0.1 um) and 1/d agree with dxtbx's own detector model."""
    from peaknet_xtal.formats.dxtbx_images import DxtbxSource

    source = DxtbxSource(real_data / rel)
    detector, beam = source.imageset.get_detector(0), source.imageset.get_beam(0)
    geometry = source.geometry
    rng = np.random.default_rng(1)
    for index in rng.choice(len(detector), size=min(5, len(detector)), replace=False):
        panel = detector[int(index)]
        fast, slow = panel.get_image_size()
        pfs, pss = rng.uniform(0, fast - 1, 4), rng.uniform(0, slow - 1, 4)
        x, y, z = geometry.panel_to_lab(np.full(4, index), pfs, pss)
        one_over_d = geometry.panel_to_one_over_d(np.full(4, index), pfs, pss)
        size = np.array(panel.get_pixel_size())
        s0 = np.array(beam.get_s0())
        for k in range(4):
            # dxtbx pixel coordinates put the corner at 0; CrystFEL has no parallax correction,
            # so compare with the uncorrected millimetre position on the panel
            mm = (pfs[k] + 0.5) * size[0], (pss[k] + 0.5) * size[1]
            lab = np.array(panel.get_lab_coord(mm)) / 1000.0
            np.testing.assert_allclose([x[k], y[k], z[k]], lab * [-1, 1, -1], atol=1e-7)
            s1 = lab / np.linalg.norm(lab) * np.linalg.norm(s0)
            assert one_over_d[k] == pytest.approx(np.linalg.norm(s1 - s0), rel=1e-6)


def test_bad_files_raise_format_error(tmp_path, dials_env):
    from peaknet_xtal.formats.dxtbx_images import read_dxtbx_image, sniff_dxtbx

    junk = tmp_path / "junk.cbf"
    junk.write_text("this is not an image\n")
    with pytest.raises(FormatError, match="junk.cbf") as err:
        read_dxtbx_image(junk)
    assert err.value.path == str(junk)
    with pytest.raises(FormatError, match="file not found"):
        read_dxtbx_image(tmp_path / "missing.cbf")
    assert sniff_dxtbx("a.cbf.bz2") and sniff_dxtbx("b.CBF") and not sniff_dxtbx("c.stream")


def test_an_image_without_dials_is_refused_naming_it(tmp_path, monkeypatch):
    """Every adapter reads dxtbx images through open_imageset: in a Python without DIALS it
    names the file and what to do, an ImportError (a bare 'No module named dxtbx' before)."""
    from peaknet_test_support import hide_dials

    from peaknet_xtal.formats.dxtbx_images import DxtbxSource

    image = tmp_path / "x_0001.cbf"
    image.write_text("never opened\n")
    hide_dials(monkeypatch)
    with pytest.raises(ImportError, match=rf"^reading {image} through dxtbx needs DIALS, "
                       r"which this Python cannot import \(No module named 'dxtbx'\)"):
        DxtbxSource(image)
    with pytest.raises(FormatError, match="file not found"):  # what is known without it
        DxtbxSource(tmp_path / "missing.cbf")

# --------------------------------------------------------------------------------------------
# NeXus (NXmx) files, as Eiger and JUNGFRAU writers make them


def test_every_still_shot_of_a_nexus_file_is_read(tmp_path, dials_env):
    """DIALS makes one imageset of each still of a NeXus file of still shots; the first alone
    was read (peaknet2cxi wrote 1 frame of 3, exit 0).  A rotation file is one imageset."""
    from peaknet_test_support import tiny_nxmx

    from peaknet_xtal.formats.dxtbx_images import DxtbxSource

    stack = np.random.default_rng(0).poisson(3, (3, 40, 48)).astype(np.uint16)
    for still in (True, False):
        source = DxtbxSource(tiny_nxmx(tmp_path / str(still), stack, still=still))
        frames = list(source)
        assert len(source) == len(frames) == 3
        assert [f.event for f in frames] == ["//0", "//1", "//2"]
        for frame, image in zip(frames, stack, strict=True):
            np.testing.assert_array_equal(frame.panels[0], image)


@pytest.mark.parametrize("stored,gap_value", [(np.uint16, 65535), (np.uint32, 0xFFFFFFFF),
                                              (np.int32, -1)])
def test_gap_values_dxtbx_leaves_in_are_masked_as_stored_data_mark_them(
        tmp_path, dials_env, stored, gap_value):
    """A NeXus file without a pixel mask or bit depth leaves its gaps' marked values (65535 in
    16-bit data, 0xFFFFFFFF in 32-bit, which dxtbx hands over as -1) in DIALS' trusted range:
    13-15 false peaks a frame along an Eiger 1M's gaps, and a gain measured as 0.5.  The
    frame says the type its whole-number values imply, so the finding pipeline masks them, as
    it does for CXI input; float data mark nothing."""
    from peaknet_test_support import tiny_nxmx

    from peaknet_xtal.finding.api import PeakFinder
    from peaknet_xtal.finding.sanitise import implied_dtype, sanitise_frame
    from peaknet_xtal.formats.dxtbx_images import DxtbxSource, image_arrays

    stack = np.random.default_rng(1).poisson(3, (2, 40, 48)).astype(stored)
    stack[:, :, 20:22] = gap_value
    source = DxtbxSource(tiny_nxmx(tmp_path, stack))
    frame = source.frame(1)
    assert frame.masks[0][:, 20:22].all()  # DIALS' own mask keeps them
    goods = sanitise_frame(frame.panels, frame.masks, frame.meta["dtype"])[1][0]
    assert not goods[:, 20:22].any() and goods[:, :20].all() and goods[:, 22:].all()
    # the Python API on the imageset: no peak on or beside the gap
    peaks = PeakFinder().find(source.imageset, 1)
    assert not np.any(np.abs(peaks["fs"] - 20.5) < 3)
    floats = stack.astype(np.float32) * np.float32(1.25)  # keV, say: not whole numbers
    floats[:, :, 20:22] = 0.0
    imageset = DxtbxSource(tiny_nxmx(tmp_path / "f", floats)).imageset
    assert implied_dtype(image_arrays(imageset, 0)[0]) is None


# --------------------------------------------------------------------------------------------
# an image read through a CrystFEL geometry (peaknet2cxi -g, stream2labels): as indexamajig -g
# reads a CBF file, the file's one array cut into the geometry's panels and masked by it


def _spiked(size: int = 48) -> np.ndarray:
    pixels = np.random.default_rng(3).poisson(5, (size, size))
    pixels[30, 20] = 5000  # above the flag_morethan below
    return pixels


def _two_panels(make_geometry_text, tmp_path, head: str = "", extra: str = "", **keys
                ) -> object:
    """A geometry cutting a 48 x 48 image into two 48 x 24 panels; ``head``: panel properties
    for both (CrystFEL applies them to the panels after them), ``extra``: bad regions."""
    from peaknet_xtal.formats.geometry import read_geometry

    path = tmp_path / "two.geom"
    path.write_text(head + make_geometry_text(["top", "bottom"], 48, 24, [(-24, -24), (-24, 0)],
                                              data=None, dims=False, extra=extra, **keys))
    return read_geometry(path)


def test_a_cbf_read_through_a_geometry_is_cut_and_masked_as_indexamajig_reads_it(
        tmp_path, dials_env, make_geometry_text):
    """Panels are the geometry's cuts of the image; its bad region, value flag and mask file
    mask pixels DIALS keeps (and DIALS' own mask still counts); its photon energy wins over
    the header's; read without it, the image is DIALS' one panel, unchanged."""
    from peaknet_test_support import tiny_cbf

    from peaknet_xtal.formats.dxtbx_images import DxtbxSource
    from peaknet_xtal.formats.geometry import HC_EV_A

    cbf = tiny_cbf(tmp_path / "spiked_0001.cbf", 100.0, pixels=_spiked())
    with h5py.File(tmp_path / "mask.h5", "w") as h5:
        mask = np.ones((48, 48), np.uint8)
        mask[40, 7] = 0
        h5["/m"] = mask
    geometry = _two_panels(make_geometry_text, tmp_path, head=(
        "flag_morethan = 1000\n"
        f"mask_file = {tmp_path / 'mask.h5'}\nmask = /m\nmask_good = 0x1\nmask_bad = 0x0\n"),
        extra=("bad_box/min_fs = 10\nbad_box/max_fs = 12\nbad_box/min_ss = 5\nbad_box/max_ss = 6\n"
        "bad_box/panel = top\n"))
    plain = DxtbxSource(cbf).frame(0)
    (image,), (dials_good,) = plain.panels, plain.masks
    assert plain.meta["panels"][0]["wavelength_A"] == pytest.approx(1.0)
    frame = DxtbxSource(cbf, geometry=geometry).frame(0)
    assert frame.geometry is geometry and frame.event == "//"
    np.testing.assert_array_equal(frame.panels[0], image[:24])
    np.testing.assert_array_equal(frame.panels[1], image[24:])
    expected = dials_good.copy()
    expected[5:7, 10:13] = False  # the bad region (panel top, fs 10-12, ss 5-6)
    expected[30, 20] = False  # above flag_morethan
    expected[40, 7] = False  # the mask file's bad pixel
    np.testing.assert_array_equal(np.concatenate(frame.masks), expected)
    assert np.count_nonzero(~expected) > np.count_nonzero(~dials_good)
    assert frame.meta["wavelength_A"] == pytest.approx(HC_EV_A / 9000.0)
    # a photon energy the geometry reads from HDF5 cannot come from a CBF: the header's counts
    by_path = _two_panels(make_geometry_text, tmp_path, photon_energy="/LCLS/photon_energy_eV")
    assert "wavelength_A" not in DxtbxSource(cbf, geometry=by_path).frame(0).meta


def test_a_mask_the_geometry_places_in_the_image_file_is_warned_about_once_and_skipped(
        tmp_path, dials_env, make_geometry_text, caplog):
    from peaknet_test_support import tiny_cbf

    from peaknet_xtal.formats.dxtbx_images import DxtbxSource

    cbf = tiny_cbf(tmp_path / "plain_0001.cbf", 100.0)
    geometry = _two_panels(make_geometry_text, tmp_path,
                           head="mask = /entry_1/data_1/mask\nmask_good = 0x1\n")
    source = DxtbxSource(cbf, geometry=geometry)
    frames = [source.frame(0), source.frame(0)]
    np.testing.assert_array_equal(np.concatenate(frames[0].masks),
                                  DxtbxSource(cbf).frame(0).masks[0])
    warned = [r for r in caplog.records if "which is not HDF5" in r.getMessage()]
    assert len(warned) == 1 and str(cbf) in warned[0].getMessage()


def test_a_pilatus_12m_cbf_is_read_through_a_geometry_as_its_one_array(real_data, dials_env,
                                                                        tmp_path):
    """DIALS reads the 12M's one 5071 x 2463 array as 24 modules; through a one-panel geometry
    of that array each module lies at its raw-image offset and the rows between them are
    masked."""
    from peaknet_xtal.formats.dxtbx_images import DxtbxSource, array_layout
    from peaknet_xtal.formats.geometry import read_geometry

    path = real_data / "synchrotron_single_images" / "DLS_I23_P12M_thau_00001.cbf.gz"
    plain = DxtbxSource(path)
    layout = array_layout(plain.imageset.get_detector(0))
    assert layout is not None and layout[0] == (5071, 2463)
    geom = tmp_path / "p12m.geom"
    geom.write_text("photon_energy = 12000\nclen = 0.2\nres = 5814\n"
                    "all/min_fs = 0\nall/max_fs = 2462\nall/min_ss = 0\nall/max_ss = 5070\n"
                    "all/fs = +x\nall/ss = +y\nall/corner_x = -1231\nall/corner_y = -2535\n")
    through = DxtbxSource(path, geometry=read_geometry(geom)).frame(0)
    (image,), (good,) = through.panels, through.masks
    frame = plain.frame(0)
    covered = np.zeros(image.shape, bool)
    for (rows, cols), module, mask in zip(layout[1], frame.panels, frame.masks, strict=True):
        np.testing.assert_array_equal(image[rows, cols], module)
        np.testing.assert_array_equal(good[rows, cols], mask)
        covered[rows, cols] = True
    assert not good[~covered].any() and (~covered).sum() == 23 * 17 * 2463


def test_an_image_that_does_not_fit_the_geometry_is_a_geometry_error_naming_it(
        real_data, dials_env, tmp_path, make_geometry_text):
    """CSPAD CBF files hold one array per sensor (DIALS' 64 panels all at offset 0): there is
    no one array to cut; a geometry larger than the image, or a stacked one, does not fit.
    Each says so when the file is opened, before any pixel is read."""
    from peaknet_test_support import tiny_cbf

    from peaknet_xtal.errors import GeometryError
    from peaknet_xtal.formats.dxtbx_images import DxtbxSource
    from peaknet_xtal.formats.geometry import read_geometry

    cspad = real_data / "cspad_thermolysin_stills" / "idx-20130301060858401.cbf"
    geometry = read_geometry(real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom")
    with pytest.raises(GeometryError, match="64 panels that are not parts of one image") as info:
        DxtbxSource(cspad, geometry=geometry)
    assert info.value.path == str(cspad)
    cbf = tiny_cbf(tmp_path / "small_0001.cbf", 100.0)
    big = tmp_path / "big.geom"
    big.write_text(make_geometry_text(["p"], 64, 64, [(-32, -32)], data=None, dims=False))
    with pytest.raises(GeometryError, match=r"reach 64 x 64 pixels .* past this image's 48 x 48"):
        DxtbxSource(cbf, geometry=read_geometry(big))
    stacked = tmp_path / "stacked.geom"  # two modules in slots of an extra dimension
    stacked.write_text("photon_energy = 9000\nclen = 0.1\nres = 10000\n" + "".join(
        f"{n}/dim0 = %\n{n}/dim1 = {k}\n{n}/dim2 = ss\n{n}/dim3 = fs\n{n}/min_fs = 0\n"
        f"{n}/max_fs = 47\n{n}/min_ss = 0\n{n}/max_ss = 23\n{n}/fs = x\n{n}/ss = y\n"
        f"{n}/corner_x = -24\n{n}/corner_y = {-24 + 30 * k}\n" for k, n in enumerate("ab")))
    with pytest.raises(GeometryError, match="stack of modules"):
        DxtbxSource(cbf, geometry=read_geometry(stacked))
    by_path = tmp_path / "clen_path.geom"  # CrystFEL's own Pilatus example reads clen so
    by_path.write_text(make_geometry_text(["p"], 48, 48, [(-24, -24)], data=None, dims=False,
                                          clen="/LCLS/detectorPosition"))
    with pytest.raises(GeometryError, match=r"camera length is read from an HDF5 file \(clen = "
                       r"/LCLS/detectorPosition\).*give clen as a number .*0\.1000 m"):
        DxtbxSource(cbf, geometry=read_geometry(by_path))


# --------------------------------------------------------------------------------------------
# the gain of dxtbx's corrected data, as the geometry made from its detector declares it


def test_an_image_read_through_a_geometry_keeps_the_files_values_and_the_geometrys_gain(
        tmp_path, dials_env, make_geometry_text):
    """Through a CrystFEL geometry (``-g``) the pixels are the values the file holds, as
    indexamajig reads them, and the gain is the geometry's (ADU per photon of those values).
    An ADSC image (header gain 2.4, pedestal 40) was read as dxtbx's corrected data, divided by
    2.4, and declared to count photons, so a geometry saying 1.8 was written into peaknet.geom
    over pixels it did not describe; without a gain in the geometry, the gain is measured from
    the pixels as for any file read with -g."""
    from peaknet_test_support import tiny_smv

    from peaknet_xtal.finding.settings import resolve_gain
    from peaknet_xtal.formats.dxtbx_images import DxtbxSource
    from peaknet_xtal.formats.geometry import read_geometry

    pixels = np.random.default_rng(8).poisson(6, (40, 48)) * 12 + 40
    image = tiny_smv(tmp_path / "adsc_001.img", pixels, gain=2.4, pedestal=40)
    for gain in ("1.8", None):
        geom = tmp_path / f"adsc_{gain}.geom"
        geom.write_text(make_geometry_text(["q0"], 48, 40, [(-24, -20)], data=None, dims=False,
                                           adu_per_photon=gain))
        frame = DxtbxSource(image, geometry=read_geometry(geom)).frame(0)
        np.testing.assert_array_equal(frame.panels[0], pixels.astype(np.float32))
        assert frame.meta["adu_per_photon"] is None
        resolved = resolve_gain(meta=frame.meta, geometry=frame.geometry,
                                estimate=lambda: -1.0)
        assert resolved == (pytest.approx(1.8) if gain else -1.0)
    # read without a geometry, the corrected pixels and their gain, 1, as before
    plain = DxtbxSource(image).frame(0)
    np.testing.assert_allclose(plain.panels[0], (pixels - 40) / 2.4, rtol=1e-6)
    assert plain.meta["adu_per_photon"] == 1


def test_the_geometry_of_an_smv_image_declares_the_gain_of_the_pixels_it_describes(
        tmp_path, dials_env):
    """dxtbx hands over an ADSC image divided by the gain its header declares (2.4), and the
    geometry made from its detector said ``adu_per_photon = 2.4``, so peaknet-integrate on
    peaknet.geom divided those pixels by 2.4 a second time (0.33x the photons) while the
    finder counted them as photons.  The pixels, the geometry, the gain the finder resolves
    and the one the CXI writer writes now all say 1."""
    from peaknet_test_support import tiny_smv

    from peaknet_xtal.finding.settings import resolve_gain
    from peaknet_xtal.formats.cxi import cxi_geometry
    from peaknet_xtal.formats.dxtbx_images import (
        CORRECTED_GAIN,
        DxtbxSource,
        geometry_text_from_dxtbx,
    )

    pixels = np.random.default_rng(5).poisson(6, (40, 48)) * 12 + 40
    source = DxtbxSource(tiny_smv(tmp_path / "adsc_001.img", pixels, gain=2.4, pedestal=40))
    assert source.imageset.get_detector()[0].get_gain() == pytest.approx(2.4)
    frame = source.frame(0)
    np.testing.assert_allclose(frame.panels[0], (pixels - 40) / 2.4, rtol=1e-6)
    assert frame.meta["adu_per_photon"] == CORRECTED_GAIN == 1
    assert frame.geometry.detector_gain() == pytest.approx(CORRECTED_GAIN)
    assert resolve_gain(geometry=frame.geometry) == pytest.approx(CORRECTED_GAIN)
    assert resolve_gain(meta=frame.meta, geometry=frame.geometry) == pytest.approx(1.0)
    assert cxi_geometry(frame.geometry).detector_gain() == pytest.approx(CORRECTED_GAIN)
    text = geometry_text_from_dxtbx(source.imageset.get_detector(0), source.imageset.get_beam(0))
    assert "adu_per_photon = 1\n" in text and "(2.4 ADU per photon)" in text  # a comment
    # peaknet2cxi writes that gain into peaknet.geom, which peaknet-integrate reads
    from peaknet_test_support import BrightPredictor

    from peaknet_xtal.cli.peaknet2cxi import run
    from peaknet_xtal.formats.geometry import read_geometry

    pixels[10:13, 20:23] += 2000
    image = tiny_smv(tmp_path / "spot_001.img", pixels, gain=2.4, pedestal=40)
    run({"inputs": [str(image)], "output": str(tmp_path / "out"), "progress": False,
         "predictor": BrightPredictor(300.0), "min_peaks": 1})
    written = read_geometry(tmp_path / "out" / "peaknet.geom")
    assert written.detector_gain() == pytest.approx(CORRECTED_GAIN)


# --------------------------------------------------------------------------------------------
# files shorter than their header says: dxtbx reads the missing pixels as zeros


def _tiny_mccd(path: Path, pixels: np.ndarray) -> Path:
    """A Rayonix ``.mccd`` (TIFF, 4096-byte header) dxtbx reads with FormatTIFFRayonix."""
    import struct

    n = pixels.shape[0]
    header = bytearray(4096)
    header[0:8] = b"II*\x00" + struct.pack("<I", 8)
    tags = [(256, 4, n), (257, 4, n), (258, 3, 16), (259, 3, 1), (262, 3, 1),
            (273, 4, 4096), (277, 3, 1), (278, 4, n), (279, 4, n * n * 2)]
    header[8:10] = struct.pack("<H", len(tags))
    for k, (tag, kind, value) in enumerate(tags):
        packed = (struct.pack("<HHII", tag, kind, 1, value) if kind == 4
                  else struct.pack("<HHIHH", tag, kind, 1, value, 0))
        header[10 + 12 * k:22 + 12 * k] = packed

    def put(offset: int, fmt: str, *values: int) -> None:
        header[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)

    put(1024, "<I", 2)
    put(1024 + 80, "<III", n, n, 2)
    put(1024 + 112, "<IIII", 1, 0, 0, 0)
    put(1664, "<i", 100000)  # distance, um
    put(1668, "<ii", n * 500, n * 500)  # beam, 0.001 px
    put(1676, "<ii", 1000, 1000)
    put(1796, "<ii", 79348, 79348)  # pixel size, nm
    put(1932, "<i", 100000)  # wavelength, fm
    header[2368:2383] = b"061012002008.00"
    path.write_bytes(bytes(header) + np.asarray(pixels, "<u2").tobytes())
    return path


def test_an_image_file_shorter_than_its_header_says_is_refused_naming_it(tmp_path, dials_env):
    """A truncated SMV image passed (dxtbx zero-fills: the missing half was the pedestal's
    negative, unmasked, and the file gave 128 peaks instead of 236, exit 0), and so did a cut
    Rayonix ``.mccd``.  Each file's header says its size (SMV: HEADER_BYTES + SIZE1 x SIZE2
    pixels of TYPE; TIFF: StripOffsets + width x height pixels of BitsPerSample); a shorter
    file is refused, naming it and the byte counts, wherever it is read."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from peaknet_test_support import tiny_smv

    from peaknet_xtal.finding.api import PeakFinder
    from peaknet_xtal.formats.dxtbx_images import DxtbxSource, image_arrays, read_dxtbx_image

    pixels = np.random.default_rng(6).poisson(6, (32, 32)) + 40
    whole = {"smv": tiny_smv(tmp_path / "whole_001.img", pixels),
             "mccd": _tiny_mccd(tmp_path / "whole_001.mccd", pixels)}
    for kind, path in whole.items():
        assert read_dxtbx_image(path).panels[0].shape == (32, 32), kind  # whole files read
        cut = tmp_path / f"cut_001.{path.suffix[1:]}"
        data = path.read_bytes()
        cut.write_bytes(data[:len(data) - 1000])
        size = len(data) - 1000
        with pytest.raises(FormatError, match=rf"truncated: {size} bytes, 1000 short of what "
                                              rf"its {'SMV' if kind == 'smv' else 'TIFF'} "
                                              rf"header says \({len(data)}") as err:
            DxtbxSource(cut).frame(0)
        assert err.value.path == str(cut)
        imageset = ExperimentListFactory.from_filenames([str(cut)]).imagesets()[0]
        with pytest.raises(FormatError, match="truncated"):
            image_arrays(imageset, 0)  # the DIALS plugin reads through it
        with pytest.raises(FormatError, match=f"{cut}: truncated"):
            PeakFinder(predictor=lambda panels, masks: [0 * p for p in panels]).find(imageset)


# --------------------------------------------------------------------------------------------
# Eiger masters whose frames lie in several data files (data_000001, data_000002, ...)


def _two_data_files(folder: Path, stack: np.ndarray, first: int, *, still: bool) -> Path:
    """An NXmx master (tiny_nxmx's) of ``stack`` whose frames lie in two data files, as the
    DECTRIS filewriter splits a run: ``first`` frames in data_000001, the rest in data_000002,
    each linked from /entry/data with its image_nr_low / image_nr_high."""
    from peaknet_test_support import tiny_nxmx

    master = tiny_nxmx(folder, stack, still=still)
    parts = [(1, stack[:first], 1), (2, stack[first:], first + 1)]
    for k, part, low in parts:
        name = f"tiny_data_{k:06d}.h5"
        with h5py.File(folder / name, "w") as h5:
            h5["/entry/data/data"] = part
            h5["/entry"].attrs["NX_class"] = "NXentry"
            h5["/entry/data"].attrs["NX_class"] = "NXdata"
            h5["/entry/data/data"].attrs.update(image_nr_low=low,
                                                image_nr_high=low + len(part) - 1)
        with h5py.File(master, "a") as h5:
            h5["/entry/data"].pop(f"data_{k:06d}", None)
            h5[f"/entry/data/data_{k:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
    return master


@pytest.mark.parametrize("still", [True, False], ids=["stills", "rotation"])
def test_a_master_whose_frames_dxtbx_cannot_all_read_is_refused_naming_the_counts(
        tmp_path, dials_env, still):
    """dxtbx 3.12's NXmx reader reads the first dataset of /entry/data alone: a still-shot
    master of 5 frames in two data files was read as 3 (3 written, exit 0), a rotation master
    read 3 and then failed as if damaged.  Such a master is refused before any frame is read,
    saying how many frames its data files hold and how many DIALS reads; the Python API on its
    imageset refuses it too."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_xtal.finding.api import PeakFinder
    from peaknet_xtal.formats.dxtbx_images import DxtbxSource

    stack = np.random.default_rng(7).poisson(3, (5, 40, 48)).astype(np.uint16)
    master = _two_data_files(tmp_path, stack, 3, still=still)
    counts = r"5 frames in the data files \(data_000001: 3, data_000002: 2\), DIALS reads 3"
    with pytest.raises(FormatError, match=counts) as err:
        DxtbxSource(master)
    assert err.value.path == str(master)
    imageset = ExperimentListFactory.from_filenames([str(master)]).imagesets()[0]
    finder = PeakFinder(device="cpu")
    with pytest.raises(FormatError, match=counts):
        finder.find(imageset, 0)
    # a data file gone after the imageset was made is said as that, not as a count
    (tmp_path / "tiny_data_000002.h5").unlink()
    with pytest.raises(FormatError, match=r"data_000002: its data file tiny_data_000002.h5 "
                                          r"cannot be opened"):
        PeakFinder(device="cpu").find(imageset, 0)


@pytest.mark.parametrize("still", [True, False], ids=["stills", "rotation"])
def test_dials_find_spots_refuses_that_master_as_a_user_error(tmp_path, dials_env, still):
    """The DIALS plugin refuses it too, as DIALS' one-line user error with the counts: it found
    the frames of the first data file, exit 0, no word (``dials.import`` takes the master, and
    DIALS hands the plugin only the images its dxtbx reads).  On a rotation DIALS finds spots
    in its job scheduler even with one process, and prints the worker's trace of any error
    raised there ("easy_mp crash detected; subprocess trace") before the user error itself:
    DIALS' own reporting, left as it is; so is the race its job scheduler sometimes loses while
    shutting down after that error on a busy machine (a second traceback ending in "KeyError:
    ... identifier( jobid = N )" from libtbx/scheduling/job_scheduler.py, seen once in a test run
    beside other jobs; the one user error is still printed)."""
    import re
    import subprocess

    from peaknet_xtal.evaluation.dials_commands import dials_environment, dials_program

    env = dials_environment(dials_env)
    stack = np.random.default_rng(7).poisson(3, (5, 40, 48)).astype(np.uint16)
    master = _two_data_files(tmp_path, stack, 3, still=still)
    outputs = []
    for command, args in (("import", [str(master)]),
                          ("find_spots", ["imported.expt", "spotfinder.threshold.algorithm=peaknet",
                                          "spotfinder.threshold.peaknet.threads=1"])):
        proc = subprocess.run([dials_program(command, env.get("PATH")), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        outputs.append((proc.returncode, proc.stdout + proc.stderr))
    assert outputs[0][0] == 0, outputs[0][1][-2000:]
    rc, text = outputs[1]
    text = re.sub(r"easy_mp crash detected; subprocess trace: -+\n.*?\n-{20,}\n", "", text,
                  flags=re.S)
    text = re.sub(r"Traceback \(most recent call last\):\n(?:(?!Traceback).*\n)*?.*"
                  r"libtbx/scheduling/job_scheduler\.py.*\n(?:(?!Traceback).*\n)*?KeyError: "
                  r"'[^\n]*identifier\( jobid = \d+ \)'\n?", "", text)
    sorry = [line for line in text.splitlines() if line.startswith("Sorry:")]
    assert rc != 0 and len(sorry) == 1 and "Traceback" not in text, text[-3000:]
    assert str(master) in sorry[0] and "5 frames in the data files" in sorry[0], sorry[0]
    assert not (tmp_path / "strong.refl").exists()


def test_running_out_of_memory_reading_an_image_is_not_a_damaged_file():
    """A MemoryError inside dxtbx's read is the machine's limit, raised as itself: it was
    wrapped as the file's fault, and peaknet2cxi said a sound CBF "may be damaged or truncated"
    (a user trial under prlimit)."""
    from peaknet_xtal.formats.dxtbx_images import image_arrays

    class Starved:  # an imageset without files whose read runs out of memory
        def get_corrected_data(self, index):
            raise MemoryError()

        get_raw_data = get_corrected_data

        def get_mask(self, index):
            return ()

    for raw in (False, True):
        with pytest.raises(MemoryError):
            image_arrays(Starved(), 0, "sound.cbf", raw=raw)
