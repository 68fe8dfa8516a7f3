"""CrystFEL geometry files (``.geom``): read, write, and coordinate conversions.

INTERFACE CONTRACT (implementation in progress; other modules code against these names):

    read_geometry(path) -> Geometry            raises GeometryError(path, msg, line=N)
    parse_geometry(text, path=None) -> Geometry
    write_geometry(geometry, path, **extra_keys) -> None   (atomic; extra global keys such as
                                                           peak_list=..., peak_list_type=cxi)
    Geometry.to_text(**extra_keys) -> str

    Geometry fields:
        panels: list[Panel]           in file order
        data: str | None              HDF5 path, e.g. "/entry_1/data_1/data"
        dims: list[str]               e.g. ["%", "ss", "fs"]
        photon_energy_eV: float | None  (from photon_energy / wavelength / electron_voltage;
                                         None when given as an HDF5 path)
        wavelength_A: float | None
        clen_m: float | None          global detector distance (None if an HDF5 path)
        adu_per_photon: float | None
        bandwidth: float | None
        peak_list: str | None; peak_list_type: str | None
        mask: str | None; mask_file: str | None; mask_good; mask_bad  (mask0_* aliases)
        bad_regions: list[BadRegion]
        keys: dict[str, str]          every global key/value as written
        path: str | None
        slab_shape -> (n_ss, n_fs)     raw data array extent covering all panels
        n_panels -> int
        panel_by_name(name) -> Panel
        panel_slices() -> list[tuple[slice, slice]]   (ss slice, fs slice) of each panel in the slab
        split_slab(slab: (ss, fs) array) -> list[np.ndarray]   per-panel views
        assemble_slab(panels: list[np.ndarray], fill=0) -> np.ndarray
        bad_pixel_masks() -> list[np.ndarray bool, True = good]  from bad regions, no_index,
                                                                 mask_edge_pixels
        raw_to_panel(fs, ss) -> (panel_index, pfs, pss)   arrays; -1 where no panel
        panel_to_raw(panel_index, pfs, pss) -> (fs, ss)
        panel_to_lab(panel_index, pfs, pss) -> (x, y, z)  metres, +z along the beam, +y up;
                                                          (pfs, pss) are 0-based pixel-centre
                                                          indices (centre of pixel i is i; the
                                                          panel corner is at -0.5)
        lab_to_one_over_d(x, y, z, wavelength_A=None) -> 1/d in 1/Angstrom
        panel_to_one_over_d(panel_index, pfs, pss, wavelength_A=None) -> 1/d in 1/Angstrom
        lab_to_panel(x, y, z) -> (panel_index, pfs, pss)   ray from the sample, -1 where none

    Panel fields (all per-panel values resolved: globals apply to panels defined after them):
        name, min_fs, max_fs, min_ss, max_ss (inclusive, raw slab coords)
        fs: np.ndarray (3,)  ss: np.ndarray (3,)  lab direction of +1 pixel, in pixels
        corner_x, corner_y (pixels), res (pixels per metre), clen_m (float | None),
        coffset_m, adu_per_photon, max_adu, no_index: bool, mask_edge_pixels: int
        width (= max_fs - min_fs + 1), height, shape -> (height, width)
        dim_index: dict[int, int] fixed dimension indices for EuXFEL-style layouts
"""
from __future__ import annotations
