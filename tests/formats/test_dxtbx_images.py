"""Every DIALS-readable image in the shared real data, through Debian's dxtbx."""
from __future__ import annotations

from pathlib import Path

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
