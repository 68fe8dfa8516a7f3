"""CrystFEL geometry files (``.geom``): read, write, and coordinate conversions.

A ``.geom`` file says where every detector panel sits in the raw data array and in the lab.  The
peak finder needs it for three things: splitting a raw slab into panels, turning a pixel into a
resolution (1/d) and writing peaks that CrystFEL can read back.  The grammar accepted here is the
union of CrystFEL 0.9 to 0.12 (``rigid_group*`` and ``group_*`` lines are checked as CrystFEL
checks them, and otherwise ignored).  What CrystFEL refuses raises GeometryError; what it
accepts but cannot be meant (an unrecognised key, a panel key given twice with two values, a
gain or max_adu at or below zero, an implausible camera length, a bad region with min above
max) is kept in ``Geometry.warnings`` and logged once as a warning.

INTERFACE CONTRACT (other modules code against these names):

    read_geometry(path) -> Geometry            raises GeometryError(path, msg, line=N)
    parse_geometry(text, path=None) -> Geometry
    write_geometry(geometry, path, **extra_keys) -> None   (atomic; extra global keys such as
                                                           peak_list=..., peak_list_type=cxi)
    Geometry.to_text(**extra_keys) -> str

    Geometry fields:
        panels: list[Panel]           in file order
        data: str | None              HDF5 path, e.g. "/entry_1/data_1/data": the one dataset
                                      of every panel (panels in several are refused)
        dims: list[str]               e.g. ["%", "ss", "fs"] (those of the first panel when panels
                                      carry their own, e.g. ["%", "0", "ss", "fs"] for AGIPD)
        photon_energy_eV: float | None  (from photon_energy / wavelength / electron_voltage;
                                         None when given as an HDF5 path)
        wavelength_A: float | None
        clen_m: float | None          global detector distance (None if an HDF5 path)
        clen_path: str | None         the HDF5 path (with its unit, if any) when given as one
        photon_energy_path: str | None  the HDF5 path alone when photon_energy, wavelength or
                                        electron_voltage name one; photon_energy_path_unit says
                                        what it holds (eV, keV, m, A, V, kV):
                                        photon_energy_eV_of(value) converts a value read there
        adu_per_photon: float | None
        bandwidth: float | None
        peak_list: str | None; peak_list_type: str | None
        mask: str | None; mask_file: str | None; mask_good; mask_bad  (the top-level mask 0)
        panel_masks() -> list[list[MaskSpec]]   each panel's masks 0-7 as CrystFEL resolves them
        mask_specs() -> list[(MaskSpec, panel indices)]   the distinct masks, for readers
        free_mask_slot() -> int | None  the first mask number 0-7 the geometry leaves unused
        indexamajig_problems() -> list[str]   what would make indexamajig refuse the geometry
        bad_regions: list[BadRegion]
        keys: dict[str, str]          every global key/value as written (last one wins)
        path: str | None
        warnings: list[str]           "path, line N: ..." for what CrystFEL accepts but cannot
                                      be meant (logged by parse_geometry, once per process)
        slab_shape -> (n_ss, n_fs)     raw data array extent covering all panels (without the
                                       frame axis; layouts with fixed dimension indices give
                                       one extent per remaining dimension)
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
        dims: list[str] the panel's full dimension list
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.atomic import write_text_atomic
from peaknet_xtal.errors import GeometryError

log = logging.getLogger(__name__)

#: h*c in eV*Angstrom: wavelength_A = HC_EV_A / photon_energy_eV.
HC_EV_A = 12398.419843320026
_ELECTRON_MC2_EV = 510998.95000
_H_C_M_EV = 1.239841984332e-6  # h*c in eV*m

#: Keys that may appear per panel; set globally they are defaults for panels defined afterwards.
PANEL_KEYS = frozenset({
    "min_fs", "max_fs", "min_ss", "max_ss", "corner_x", "corner_y", "fs", "ss", "res", "clen",
    "coffset", "adu_per_eV", "adu_per_photon", "max_adu", "no_index", "mask_edge_pixels",
    "badrow_direction", "data", "mask", "mask_file", "mask_good", "mask_bad", "saturation_map",
    "saturation_map_file", "flag_lessthan", "flag_morethan", "flag_equal",
})
_REQUIRED_PANEL_KEYS = ("min_fs", "max_fs", "min_ss", "max_ss", "corner_x", "corner_y", "res")
_BAD_KEYS = frozenset({"min_fs", "max_fs", "min_ss", "max_ss", "min_x", "max_x", "min_y",
                       "max_y", "panel"})
_RESOLVED_PANEL_KEYS = frozenset({
    "min_fs", "max_fs", "min_ss", "max_ss", "corner_x", "corner_y", "fs", "ss", "res", "clen",
    "coffset", "adu_per_eV", "adu_per_photon", "max_adu", "no_index", "mask_edge_pixels",
})


# --------------------------------------------------------------------------------------------
# value parsers: each takes the raw string and a ``fail(msg)`` that raises with file + line
# --------------------------------------------------------------------------------------------

class _Fail:
    """Raises a GeometryError for one place in one file (keeps the parsers free of bookkeeping)."""

    def __init__(self, path: str | None, line: int | None) -> None:
        self.path = path
        self.line = line

    def __call__(self, message: str) -> GeometryError:
        return GeometryError(self.path, message, line=self.line)


def _float(value: str, key: str, fail: _Fail) -> float:
    try:
        result = float(value)
    except ValueError:
        raise fail(f"{key} = {value!r} is not a number") from None
    if not math.isfinite(result):
        raise fail(f"{key} = {value!r} is not finite")
    return result


def _int(value: str, key: str, fail: _Fail) -> int:
    """CrystFEL reads pixel ranges with atof, so ``0.0`` is a valid integer; ``0.5`` is not."""
    number = _float(value, key, fail)
    if number != int(number):
        raise fail(f"{key} = {value!r} is not a whole number")
    return int(number)


def _positive(number: float, key: str, value: str, fail: _Fail) -> float:
    """Energies, wavelengths and voltages are positive; a sign slip would make every 1/d NaN."""
    if number <= 0:
        raise fail(f"{key} = {value!r} must be positive")
    return number


def _bits(value: str, key: str, fail: _Fail) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise fail(f"{key} = {value!r} is not an integer (decimal or 0x hex)") from None


def _bool(value: str, key: str, fail: _Fail) -> bool:
    lowered = value.lower()
    if lowered in {"true", "yes"}:
        return True
    if lowered in {"false", "no"}:
        return False
    return _int(value, key, fail) != 0


def _number_with_unit(value: str, key: str, units: dict[str, float], default: str,
                      fail: _Fail) -> float:
    """``"95.3 mm"`` -> 0.0953 with ``units={"m": 1, "mm": 1e-3}``; a bare number uses
    ``default``."""
    parts = value.split()
    if len(parts) == 1:
        unit = default
    elif len(parts) == 2:
        unit = parts[1]
    else:
        raise fail(f"{key} = {value!r}: expected a number and an optional unit")
    if unit not in units:
        raise fail(f"{key} = {value!r}: unknown unit {unit!r} (expected one of {sorted(units)})")
    return _float(parts[0], key, fail) * units[unit]


def _length_or_path(value: str, key: str, fail: _Fail) -> tuple[float | None, str | None]:
    """A length in metres (``m``/``mm``), or an HDF5 path with its optional unit (value None,
    ``"path unit"`` kept: readers split it); a path with a unit other than m or mm is refused,
    as its values would be read in the wrong unit."""
    if value.startswith("/"):
        parts = value.split()
        if len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("m", "mm")):
            raise fail(f"{key} = {value!r}: expected an HDF5 path and an optional unit "
                       "(m or mm)")
        return None, " ".join(parts)
    return _number_with_unit(value, key, {"m": 1.0, "mm": 1e-3}, "m", fail), None


def parse_vector(value: str, key: str = "vector", fail: _Fail | None = None) -> np.ndarray:
    """``"+0.0010x -0.9999y +0.0z"``, ``"-x"``, ``"x"`` or ``"1e-3x+1y"`` -> array (3,)."""
    fail = fail or _Fail(None, None)
    text = "".join(value.split())
    vector = np.zeros(3)
    coefficient = ""
    terms = 0
    for char in text:
        axis = "xyz".find(char)
        if axis < 0:
            coefficient += char
            continue
        terms += 1
        if terms > 1 and not coefficient.startswith(("+", "-")):  # "xx", "x2y": no sign
            raise fail(f"{key} = {value!r} is not a direction like '+0.001x -0.999y +0.0z' "
                       "(each term after the first needs its sign)")
        if coefficient in {"", "+"}:
            number = 1.0
        elif coefficient == "-":
            number = -1.0
        else:
            number = _float(coefficient, key, fail)
        vector[axis] += number
        coefficient = ""
    if coefficient or not text:
        raise fail(f"{key} = {value!r} is not a direction like '+0.001x -0.999y +0.0z'")
    if not np.any(vector):
        raise fail(f"{key} = {value!r} is a zero vector")
    return vector


def format_vector(vector: np.ndarray) -> str:
    """Inverse of :func:`parse_vector`, exact (the shortest round-tripping decimal), in positional
    notation: CrystFEL's direction parser takes digits, ``.``, signs and ``x``/``y``/``z`` only,
    so ``+1.2e-05y`` (Python's repr of a small component) made it refuse the whole file."""
    return " ".join(f"{np.format_float_positional(float(c), unique=True, sign=True, trim='0')}"
                    f"{axis}" for c, axis in zip(vector, "xyz", strict=False))


def _electron_wavelength_A(volts: float) -> float:
    """Relativistic de Broglie wavelength of an electron accelerated through ``volts``."""
    energy = volts  # eV
    momentum_ev = math.sqrt(energy * (energy + 2.0 * _ELECTRON_MC2_EV))  # p*c in eV
    return _H_C_M_EV / momentum_ev * 1e10


#: Units a beam quantity given as an HDF5 path may hold, and their factor to the base unit (eV,
#: metres or volts); ``None`` marks the key whose path may omit its unit (photon energy: eV).
_BEAM_UNITS: dict[str, tuple[dict[str, float], str | None]] = {
    "photon_energy": ({"eV": 1.0, "keV": 1e3}, "eV"),
    "wavelength": ({"m": 1.0, "A": 1e-10}, None),
    "electron_voltage": ({"V": 1.0, "kV": 1e3}, None),
}


def photon_energy_eV_from(value: float, unit: str | None) -> float:
    """A beam value read from an HDF5 dataset, in the ``unit`` its geometry line gave it, as a
    photon energy in eV (wavelengths and electron voltages converted as for numbers), so every
    reader turns ``wavelength = /path m`` and ``photon_energy = /path keV`` alike into one
    energy.  Non-positive or non-finite values come back as NaN: the caller names the frame."""
    unit = unit or "eV"
    if not math.isfinite(value) or value <= 0:
        return float("nan")
    for key, (units, _) in _BEAM_UNITS.items():
        if unit in units:
            base = value * units[unit]
            if key == "photon_energy":
                return base
            if key == "wavelength":
                return HC_EV_A / (base * 1e10)
            return HC_EV_A / _electron_wavelength_A(base)
    raise ValueError(f"unknown beam unit {unit!r}")


def _beam_path(value: str, key: str, fail: _Fail) -> tuple[str, str]:
    """``"/LCLS/photon_energy keV"`` -> (path, unit).  The unit says what the dataset holds;
    glued to the path it made the path unreadable (NaN energies) and a wavelength was read as
    eV.  A wavelength or electron voltage without its unit is refused, as CrystFEL does: a
    dataset gives no hint whether it holds metres or Angstrom."""
    units, default = _BEAM_UNITS[key]
    parts = value.split()
    if len(parts) > 2:
        raise fail(f"{key} = {value!r}: expected an HDF5 path and one unit "
                   f"({' or '.join(units)})")
    unit = parts[1] if len(parts) == 2 else default
    if unit is None:
        raise fail(f"{key} = {value!r}: an HDF5 path needs its unit ({' or '.join(units)}), "
                   f"e.g. '{key} = {parts[0]} {next(iter(units))}'")
    if unit not in units:
        raise fail(f"{key} = {value!r}: unknown unit {unit!r} (expected one of {sorted(units)})")
    return parts[0], unit


# --------------------------------------------------------------------------------------------
# bad pixel masks: CrystFEL's mask0 ... mask7, per panel
# --------------------------------------------------------------------------------------------

#: CrystFEL reads up to eight bad pixel masks per panel, numbered 0 to 7.
MAX_MASKS = 8
_MASK_FIELDS = ("data", "file", "goodbits", "badbits")
#: The pre-0.10 names of mask 0's keys, still accepted by CrystFEL and written for mask 0.
_MASK0_LEGACY = {"data": "mask", "file": "mask_file", "goodbits": "mask_good",
                 "badbits": "mask_bad"}
_MASK_ANY = re.compile(r"mask(\d+)_([A-Za-z]+)$")


def _mask_field(key: str) -> tuple[int, str] | None:
    """``"mask3_goodbits"`` -> (3, "goodbits"), ``"mask_file"`` -> (0, "file"); None for any
    other key (``mask_edge_pixels`` included)."""
    for field_name, legacy in _MASK0_LEGACY.items():
        if key == legacy:
            return 0, field_name
    match = _MASK_ANY.fullmatch(key)
    if match and match.group(2) in _MASK_FIELDS and int(match.group(1)) < MAX_MASKS:
        return int(match.group(1)), match.group(2)
    return None


def _check_mask_key(key: str, value: str, fail: _Fail) -> None:
    """A mask key CrystFEL would refuse is refused here with its line (an unnumbered or
    out-of-range mask would otherwise be dropped silently, and its pixels used)."""
    match = _MASK_ANY.fullmatch(key)
    if match and (int(match.group(1)) >= MAX_MASKS or match.group(2) not in _MASK_FIELDS):
        raise fail(f"{key}: masks are numbered 0 to {MAX_MASKS - 1}, each with the keys "
                   f"maskN_data, maskN_file, maskN_goodbits, maskN_badbits")
    where = _mask_field(key)
    if where is None:
        return
    if where[1] in ("goodbits", "badbits"):
        _bits(value, key, fail)
    elif where[1] == "data" and not value.startswith("/"):
        raise fail(f"{key} = {value!r}: a mask location is an HDF5 path starting with '/'")


def _resolve_mask_fields(own: dict[str, str], keys: dict[str, str],
                         overridden: frozenset[str] = frozenset()) -> dict[tuple[int, str], str]:
    """The mask fields one panel ends up with: its own value, else the top-level one (of two
    names for one field, the one assigned last wins: both dicts keep the order of the last
    assignments); an empty own value means the panel has none (a top-level mask set only after
    the panel was defined).  ``overridden`` names top-level keys that beat every panel's own
    value (``to_text(mask=...)``)."""
    def by_field(values: dict[str, str]) -> dict[tuple[int, str], str]:
        out: dict[tuple[int, str], str] = {}
        for key, value in values.items():
            where = _mask_field(key)
            if where is not None:
                out[where] = value
        return out

    beaten = {_mask_field(k) for k in overridden}
    mine, top = by_field(own), by_field(keys)
    resolved: dict[tuple[int, str], str] = {}
    for where in sorted(set(mine) | set(top)):
        value = mine.get(where) if where not in beaten else None
        if value is None:
            value = top.get(where)
        if value:
            resolved[where] = value
    return resolved


@dataclass(frozen=True)
class MaskSpec:
    """One of a panel's bad pixel masks (``maskN_data``, ``maskN_file``, ``maskN_goodbits``,
    ``maskN_badbits``).  ``data`` is the HDF5 dataset (None: mask 0's default location),
    ``file`` the file holding it (None: the image file itself)."""

    index: int
    data: str | None = None
    file: str | None = None
    goodbits: int | None = None
    badbits: int | None = None

    def good(self, raw: np.ndarray) -> np.ndarray:
        """True = good: every goodbit set and no badbit set, as CrystFEL; with neither given,
        any nonzero value is good (this project's reading of a bare 0/1 mask)."""
        if self.goodbits is None and self.badbits is None:
            return np.asarray(raw) != 0
        values = np.asarray(raw).astype(np.int64)
        ok = np.ones(values.shape, dtype=bool)
        if self.goodbits:
            ok &= (values & self.goodbits) == self.goodbits
        if self.badbits:
            ok &= (values & self.badbits) == 0
        return ok


def _mask_spec(n: int, fields: dict[tuple[int, str], str], where: str | None) -> MaskSpec | None:
    """Mask ``n`` of one panel from its resolved fields; None when nothing names it."""
    got = {f: fields[(n, f)] for f in _MASK_FIELDS if (n, f) in fields}
    if not got:
        return None

    def bits(name: str) -> int | None:
        if name not in got:
            return None
        try:
            return int(got[name], 0)
        except ValueError:
            raise GeometryError(where, f"mask{n}_{name} = {got[name]!r} is not an integer "
                                       "(decimal or 0x hex)") from None

    return MaskSpec(index=n, data=got.get("data"), file=got.get("file"),
                    goodbits=bits("goodbits"), badbits=bits("badbits"))


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------

@dataclass
class Panel:
    """One rectangle of the raw data array and where it sits in the lab (all values resolved)."""

    name: str
    min_fs: int
    max_fs: int
    min_ss: int
    max_ss: int
    fs: np.ndarray
    ss: np.ndarray
    corner_x: float
    corner_y: float
    res: float
    clen_m: float | None = None
    clen_path: str | None = None
    coffset_m: float = 0.0
    adu_per_photon: float | None = None
    adu_per_eV: float | None = None
    max_adu: float | None = None
    no_index: bool = False
    mask_edge_pixels: int = 0
    dims: list[str] = field(default_factory=lambda: ["ss", "fs"])
    extra: dict[str, str] = field(default_factory=dict)
    line: int | None = None

    @property
    def width(self) -> int:
        return self.max_fs - self.min_fs + 1

    @property
    def height(self) -> int:
        return self.max_ss - self.min_ss + 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def dim_index(self) -> dict[int, int]:
        """Fixed indices of extra dimensions (``p0a0/dim1 = 0``), numbered as in the file."""
        return {n: int(d) for n, d in enumerate(self.dims) if d.lstrip("-").isdigit()}

    def _data_dims(self) -> list[str]:
        """The panel's dimensions without the frame placeholder(s)."""
        return [d for d in self.dims if d != "%"]

    def slab_index(self) -> tuple[Any, ...]:
        """Index into one frame's raw array that picks this panel (``(ss, fs)`` ordered)."""
        index: list[Any] = []
        for dim in self._data_dims():
            if dim == "ss":
                index.append(slice(self.min_ss, self.max_ss + 1))
            elif dim == "fs":
                index.append(slice(self.min_fs, self.max_fs + 1))
            else:
                index.append(int(dim))
        return tuple(index)

    def same_as(self, other: Panel) -> bool:
        """Field-by-field equality (dataclass ``==`` cannot compare numpy vectors)."""
        for name in self.__dataclass_fields__:
            if name == "line":
                continue
            a, b = getattr(self, name), getattr(other, name)
            if isinstance(a, np.ndarray):
                if not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True


@dataclass
class BadRegion:
    """A rectangle of bad pixels: raw ``fs``/``ss`` (optionally on one panel) or lab ``x``/``y``.

    ``x``/``y`` are in pixels relative to the beam, like ``corner_x``; all bounds are inclusive.
    """

    name: str
    kind: str  # "fs_ss" or "xy"
    min_fs: float | None = None
    max_fs: float | None = None
    min_ss: float | None = None
    max_ss: float | None = None
    min_x: float | None = None
    max_x: float | None = None
    min_y: float | None = None
    max_y: float | None = None
    panel: str | None = None
    line: int | None = field(default=None, compare=False)

    def to_lines(self) -> list[str]:
        keys = (("min_fs", "max_fs", "min_ss", "max_ss") if self.kind == "fs_ss"
                else ("min_x", "max_x", "min_y", "max_y"))
        lines = [f"{self.name}/{k} = {_fmt(getattr(self, k))}" for k in keys]
        if self.panel is not None:
            lines.append(f"{self.name}/panel = {self.panel}")
        return lines


def _fmt(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@dataclass
class Geometry:
    """A parsed ``.geom`` file; see the module docstring for the contract."""

    panels: list[Panel] = field(default_factory=list)
    data: str | None = None
    dims: list[str] = field(default_factory=lambda: ["ss", "fs"])
    photon_energy_eV: float | None = None
    photon_energy_path: str | None = None
    #: what the dataset at ``photon_energy_path`` holds (eV, keV, m, A, V or kV); None is eV
    photon_energy_path_unit: str | None = None
    wavelength_A: float | None = None
    clen_m: float | None = None
    clen_path: str | None = None
    adu_per_photon: float | None = None
    adu_per_eV: float | None = None
    bandwidth: float | None = None
    peak_list: str | None = None
    peak_list_type: str | None = None
    mask: str | None = None
    mask_file: str | None = None
    mask_good: int | None = None
    mask_bad: int | None = None
    bad_regions: list[BadRegion] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    #: what CrystFEL accepts in the file but cannot be meant (an unrecognised key, a key given
    #: twice, a gain or saturation value that is not positive, an implausible camera length,
    #: a bad region that covers nothing), one ``"path, line N: ..."`` sentence each; logged
    #: as warnings by :func:`parse_geometry`
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)
    #: :meth:`as_slab`'s geometry of a stacked layout, made on its first call (see there)
    _slab: Geometry | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (frames sent to Ray workers and writers carry their geometry) without the
        :meth:`as_slab` cache: the payload stays the file's, and a receiver that needs the
        slab makes it once there."""
        return {**self.__dict__, "_slab": None}

    # ---- layout ------------------------------------------------------------------------------

    @property
    def n_panels(self) -> int:
        return len(self.panels)

    def panel_by_name(self, name: str) -> Panel:
        for panel in self.panels:
            if panel.name == name:
                return panel
        raise KeyError(f"no panel named {name!r} in {self.path or 'geometry'}")

    def panel_index(self) -> dict[str, int]:
        """Name -> position, for readers that look panels up by name many times."""
        return {p.name: i for i, p in enumerate(self.panels)}

    @property
    def camera_length_path(self) -> str | None:
        """The HDF5 path (with its unit, if any) the camera length is read from per frame: the
        top-level ``clen``, or the one path every panel gives (0.9-style ``p0/clen = /LCLS/...``,
        written back as one top-level clen); None where the lengths are numbers."""
        paths = {p.clen_path for p in self.panels}
        if len(paths) == 1 and None not in paths:
            return paths.pop()
        return self.clen_path

    def photon_energy_eV_of(self, value: float) -> float:
        """A value read from ``photon_energy_path`` as a photon energy in eV (its unit is the
        geometry line's: a wavelength in metres and an energy in keV both come out right); NaN
        for a value that is not positive."""
        return photon_energy_eV_from(float(value), self.photon_energy_path_unit)

    # ---- masks -------------------------------------------------------------------------------

    def panel_masks(self) -> list[list[MaskSpec]]:
        """Each panel's bad pixel masks 0-7 (CrystFEL's ``maskN_*``, ``mask``/``mask_file``/
        ``mask_good``/``mask_bad`` being mask 0), its own keys first, else the top-level ones.
        Read from ``keys`` and each panel's ``extra``, the same values :meth:`to_text` writes,
        so a geometry rewritten with other top-level mask keys reads as it will be written."""
        out = []
        for panel in self.panels:
            fields = _resolve_mask_fields(panel.extra, self.keys)
            specs = [_mask_spec(n, fields, self.path) for n in range(MAX_MASKS)]
            out.append([spec for spec in specs if spec is not None])
        return out

    def mask_specs(self) -> list[tuple[MaskSpec, tuple[int, ...]]]:
        """The distinct masks of all panels, each with the indices of the panels it covers, in
        mask-number order: a reader reads each dataset once per frame and applies it to those
        panels only."""
        users: dict[MaskSpec, list[int]] = {}
        for i, specs in enumerate(self.panel_masks()):
            for spec in specs:
                users.setdefault(spec, []).append(i)
        return sorted(((spec, tuple(panels)) for spec, panels in users.items()),
                      key=lambda item: item[0].index)

    def free_mask_slot(self, first: int = 0) -> int | None:
        """The first mask number (``first`` to 7) no panel uses, for adding a mask
        (``maskN_file = ...``, ``maskN_data = ...``) without replacing one the geometry has;
        None when all are taken.  Mind: with no mask 0 in the geometry, this project's reader
        takes mask 0 from the image file's ``/entry_1/data_1/mask`` when there is one, and a
        geometry that names a mask 0 turns that off (so advice for files of that kind starts at
        ``first=1``)."""
        used = {spec.index for specs in self.panel_masks() for spec in specs}
        return next((n for n in range(first, MAX_MASKS) if n not in used), None)

    # ---- what indexamajig needs ----------------------------------------------------------------

    def indexamajig_problems(self) -> list[str]:
        """What would make indexamajig refuse this geometry although peak finding can use it,
        one sentence each; [] when none.  CrystFEL insists on a camera length and on a photon
        energy, wavelength or electron voltage, each a number or an HDF5 path; the finder needs
        neither (1/d limits aside), so the parser accepts a geometry without them and tools that
        print an indexamajig command ask here first.  (:func:`~peaknet_xtal.formats.
        geometry_rules.crystfel_problems` checks a written ``.geom`` text in full.)"""
        problems = []
        no_clen = [p.name for p in self.panels if p.clen_m is None and p.clen_path is None]
        if self.clen_m is None and self.clen_path is None and no_clen:
            which = "" if len(no_clen) == len(self.panels) else f" for panel {no_clen[0]}"
            problems.append(f"no camera length{which} ('clen = ...', a number or an HDF5 "
                            "path): indexamajig refuses a geometry without one")
        if self.photon_energy_eV is None and self.photon_energy_path is None:
            problems.append("no photon energy ('photon_energy', 'wavelength' or "
                            "'electron_voltage', as a number or an HDF5 path): indexamajig "
                            "refuses a geometry without one")
        return problems

    @property
    def slab_shape(self) -> tuple[int, ...]:
        if not self.panels:
            return (0, 0)
        extents: list[int] = []
        dims = self.panels[0]._data_dims()
        for axis, dim in enumerate(dims):
            if dim == "ss":
                extents.append(max(p.max_ss for p in self.panels) + 1)
            elif dim == "fs":
                extents.append(max(p.max_fs for p in self.panels) + 1)
            else:
                extents.append(max(int(p._data_dims()[axis]) for p in self.panels) + 1)
        return tuple(extents)

    @property
    def stacked(self) -> bool:
        """True for a layout with fixed dimension indices (EuXFEL-style ``p0/dim1 = 3``)."""
        return any(p.dim_index for p in self.panels)

    def stacked_blocks(self) -> list[tuple[tuple[Any, ...], int]]:
        """For a stacked layout, each module of one frame's array and the first slab row
        :meth:`as_slab` gives it: ``(index into the frame's array picking one (ss, fs) module,
        its row offset)``, modules in C order of their fixed indices."""
        dims = self.panels[0]._data_dims()
        shape = self.slab_shape
        fixed = [axis for axis, d in enumerate(dims) if d not in ("ss", "fs")]
        height = shape[dims.index("ss")]
        blocks = []
        for k, where in enumerate(np.ndindex(*(shape[a] for a in fixed))):
            index: list[Any] = [slice(0, shape[a]) for a in range(len(dims))]
            for axis, i in zip(fixed, where, strict=True):
                index[axis] = int(i)
            blocks.append((tuple(index), k * height))
        return blocks

    def as_slab(self) -> Geometry:
        """This geometry with a stacked layout's modules laid one below another in one 2-D slab
        (module k's rows start at k times the module height; order of :meth:`stacked_blocks`);
        a slab layout comes back as it is.

        Why: CrystFEL's CXI and HDF5 peak-list readers find a peak's panel from its position in
        the slab alone, and the modules of a stack share one fs/ss range, so every peak of a
        stacked layout is ambiguous to them and dropped ("Panel is ambiguous").  Files written
        for indexamajig hold such frames as a slab, with this geometry.

        Made once per geometry and kept: the CXI writer asks for it about four times a frame
        (the frame's shape, its pixels and mask, its peaks), and on AGIPD's 128 panels each
        layout took 0.4 ms, against some 30 ms to write a linked frame.  A Geometry is not
        changed once built (the parser builds it; new ones come from ``dataclasses.replace``,
        which starts them without this cache), so the kept one stays right."""
        if self._slab is not None:
            return self._slab
        if not self.stacked:
            return self
        offsets = {}
        for index, row in self.stacked_blocks():
            offsets[tuple(i for i in index if isinstance(i, int))] = row
        panels = []
        for p in self.panels:
            row = offsets[tuple(int(d) for d in p._data_dims() if d not in ("ss", "fs"))]
            dims = (["%"] if "%" in p.dims else []) + ["ss", "fs"]
            panels.append(replace(p, min_ss=p.min_ss + row, max_ss=p.max_ss + row, dims=dims))
        moved = {p.name: q.min_ss - p.min_ss for p, q in zip(self.panels, panels, strict=True)}
        regions = [replace(r, min_ss=r.min_ss + moved[r.panel], max_ss=r.max_ss + moved[r.panel])
                   if r.kind == "fs_ss" and r.panel in moved and r.min_ss is not None
                   and r.max_ss is not None else r for r in self.bad_regions]
        keys = {k: v for k, v in self.keys.items() if not _is_dim(k)}
        self._slab = replace(self, panels=panels, bad_regions=regions, keys=keys,
                             dims=panels[0].dims)
        return self._slab

    def panel_slices(self) -> list[tuple[slice, slice]]:
        return [(slice(p.min_ss, p.max_ss + 1), slice(p.min_fs, p.max_fs + 1))
                for p in self.panels]

    def split_slab(self, slab: np.ndarray) -> list[np.ndarray]:
        """Per-panel views of one frame (no copy); ``slab`` has the layout of ``slab_shape``."""
        if slab.ndim != len(self.slab_shape):
            raise GeometryError(self.path, f"data of shape {slab.shape} does not fit the "
                                           f"geometry's layout {self.slab_shape}")
        views = []
        for panel in self.panels:
            view = slab[panel.slab_index()]
            if view.shape != panel.shape:
                raise GeometryError(self.path, f"panel {panel.name} {panel.shape} does not fit "
                                               f"in data of shape {slab.shape}")
            views.append(view)
        return views

    def assemble_slab(self, panels: Sequence[np.ndarray], fill: float = 0) -> np.ndarray:
        """Inverse of :meth:`split_slab` (pixels covered by no panel get ``fill``)."""
        if len(panels) != self.n_panels:
            raise ValueError(f"expected {self.n_panels} panels, got {len(panels)}")
        dtype = np.result_type(*[np.asarray(p).dtype for p in panels]) if panels else np.float32
        slab = np.full(self.slab_shape, fill, dtype=dtype)
        for panel, values in zip(self.panels, panels, strict=False):
            slab[panel.slab_index()] = values
        return slab

    def bad_pixel_masks(self) -> list[np.ndarray]:
        """One bool array per panel, True = good, from no_index, mask_edge_pixels, bad regions."""
        masks = []
        for panel in self.panels:
            good = np.ones(panel.shape, dtype=bool)
            if panel.no_index:
                good[:] = False
            edge = panel.mask_edge_pixels
            if edge > 0:
                good[:edge, :] = False
                good[-edge:, :] = False
                good[:, :edge] = False
                good[:, -edge:] = False
            for region in self.bad_regions:
                _apply_bad_region(good, panel, region)
            masks.append(good)
        return masks

    # ---- coordinate conversions (vectorised) -------------------------------------------------

    def raw_to_panel(self, fs: Any, ss: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw slab pixel-centre coordinates -> (panel index, panel fs, panel ss); -1 if none."""
        fs = np.asarray(fs, dtype=float)
        ss = np.asarray(ss, dtype=float)
        index = np.full(np.broadcast(fs, ss).shape, -1, dtype=np.int64)
        for i, p in enumerate(self.panels):
            inside = ((fs >= p.min_fs - 0.5) & (fs < p.max_fs + 0.5)
                      & (ss >= p.min_ss - 0.5) & (ss < p.max_ss + 0.5) & (index < 0))
            index[inside] = i
        mins = self._per_panel(index, ("min_fs", "min_ss"))
        pfs = np.where(index >= 0, fs - mins[0], np.nan)
        pss = np.where(index >= 0, ss - mins[1], np.nan)
        return index, pfs, pss

    def panel_to_raw(self, panel_index: Any, pfs: Any, pss: Any) -> tuple[np.ndarray, np.ndarray]:
        index = np.asarray(panel_index, dtype=np.int64)
        mins = self._per_panel(index, ("min_fs", "min_ss"), strict=True)
        return np.asarray(pfs, dtype=float) + mins[0], np.asarray(pss, dtype=float) + mins[1]

    def panel_to_lab(self, panel_index: Any, pfs: Any, pss: Any,
                     clen_m: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel centre -> lab position in metres.  ``clen_m`` overrides a path-valued clen."""
        index = np.asarray(panel_index, dtype=np.int64)
        table = self._placement(clen_m)
        _check_indices(index, self.n_panels)
        a = np.asarray(pfs, dtype=float) + 0.5  # distance from the panel corner, in pixels
        b = np.asarray(pss, dtype=float) + 0.5
        row = table[index]
        x = (row[..., 0] + a * row[..., 3] + b * row[..., 6]) / row[..., 9]
        y = (row[..., 1] + a * row[..., 4] + b * row[..., 7]) / row[..., 9]
        z = (row[..., 2] + a * row[..., 5] + b * row[..., 8]) / row[..., 9]
        return x, y, z

    def lab_to_panel(self, x: Any, y: Any, z: Any,
                     clen_m: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the ray from the sample through (x, y, z) hits a panel (nearest hit wins)."""
        ray = np.stack(np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float),
                                           np.asarray(z, float)), axis=-1)
        shape = ray.shape[:-1]
        ray = ray.reshape(-1, 3)
        best_t = np.full(len(ray), np.inf)
        index = np.full(len(ray), -1, dtype=np.int64)
        pfs = np.full(len(ray), np.nan)
        pss = np.full(len(ray), np.nan)
        for i, (p, row) in enumerate(zip(self.panels, self._placement(clen_m), strict=False)):
            corner = row[0:3] / row[9]  # metres
            fs_m, ss_m = row[3:6] / row[9], row[6:9] / row[9]
            normal = np.cross(fs_m, ss_m)
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (normal @ corner) / (ray @ normal)
            hit = ray * t[:, None] - corner
            gram = np.array([[fs_m @ fs_m, fs_m @ ss_m], [fs_m @ ss_m, ss_m @ ss_m]])
            ab = np.linalg.solve(gram, np.stack([hit @ fs_m, hit @ ss_m])).T
            a, b = ab[:, 0] - 0.5, ab[:, 1] - 0.5
            ok = ((t > 0) & (t < best_t) & (a >= -0.5) & (a < p.width - 0.5)
                  & (b >= -0.5) & (b < p.height - 0.5))
            best_t[ok], index[ok], pfs[ok], pss[ok] = t[ok], i, a[ok], b[ok]
        return index.reshape(shape), pfs.reshape(shape), pss.reshape(shape)

    def lab_to_one_over_d(self, x: Any, y: Any, z: Any,
                          wavelength_A: float | None = None) -> np.ndarray:
        """1/d = 2 sin(theta) / lambda in 1/Angstrom, 2*theta being the angle to the beam (+z)."""
        wavelength = self._wavelength(wavelength_A)
        x, y, z = (np.asarray(v, dtype=float) for v in (x, y, z))
        cos_two_theta = z / np.sqrt(x * x + y * y + z * z)
        return np.sqrt(np.maximum(2.0 - 2.0 * cos_two_theta, 0.0)) / wavelength

    def panel_to_one_over_d(self, panel_index: Any, pfs: Any, pss: Any,
                            wavelength_A: float | None = None,
                            clen_m: float | None = None) -> np.ndarray:
        return self.lab_to_one_over_d(*self.panel_to_lab(panel_index, pfs, pss, clen_m),
                                      wavelength_A=wavelength_A)

    def detector_gain(self, wavelength_A: float | None = None,
                      panel: int | None = None) -> float | None:
        """ADU per photon the geometry declares, or None when it declares none usable.

        ``adu_per_photon`` wins; ``adu_per_eV`` needs the photon energy (the geometry's, else
        ``wavelength_A``).  For the whole detector, panel values count only when every panel
        agrees, since a single number is what shot-noise estimates downstream take; with
        ``panel`` (an index), that panel's own value comes first.
        """
        energy = (HC_EV_A / wavelength_A if wavelength_A else self.photon_energy_eV)
        if panel is not None:
            own = self.panels[panel]
            value = _gain_of(own.adu_per_photon, own.adu_per_eV, energy)
            if value is not None:
                return value
        for holders in ([self], self.panels):
            values = {_gain_of(h.adu_per_photon, h.adu_per_eV, energy) for h in holders}
            if len(values) == 1 and None not in values:
                return values.pop()
        return None

    def _wavelength(self, wavelength_A: float | None) -> float:
        if wavelength_A is not None:
            return float(wavelength_A)
        if self.wavelength_A is None:
            raise GeometryError(self.path, "no photon energy or wavelength as a number in the "
                                           "geometry; pass wavelength_A")
        return self.wavelength_A

    # ---- placement: the one panel-to-lab model (geometry, simulator, dxtbx format) -----------

    def default_clen(self, default_clen_m: float) -> float:
        """The camera length (m) for panels that state none as a number: the global numeric
        clen, else one that puts the nearest such panel (clen + coffset) at ``default_clen_m``
        (facility files pair an encoder-read clen with large negative coffsets -- the MFX
        ePix10k2M file has coffset = -0.215 m -- so the default cannot be used as is)."""
        if self.clen_m is not None:
            return float(self.clen_m)
        unknown = [float(p.coffset_m or 0.0) for p in self.panels if p.clen_m is None]
        return default_clen_m - min(unknown) if unknown else default_clen_m

    def panel_clens(self, clen_m: float | None = None, *,
                    default_clen_m: float | None = None) -> list[float]:
        """Each panel's camera length (m): ``clen_m`` for all when given, else the panel's own;
        a panel without a number is an error unless ``default_clen_m`` is given (then
        :meth:`default_clen`)."""
        out = []
        for p in self.panels:
            clen = clen_m if clen_m is not None else p.clen_m
            if clen is None and default_clen_m is not None:
                clen = self.default_clen(default_clen_m)
            if clen is None:
                raise GeometryError(self.path, f"panel {p.name}: camera length is "
                                               f"{p.clen_path or 'missing'}; pass clen_m",
                                    line=p.line)
            out.append(float(clen))
        return out

    def average_camera_length_m(self, clen_m: float | None = None) -> float | None:
        """What a CrystFEL stream's ``average_camera_length`` says: the mean over panels of
        each panel's distance from the sample along the beam, its camera length plus its
        ``coffset`` (CrystFEL: the mean of the panels' ``cnz`` times their pixel pitch, with
        ``cnz = (clen + coffset) / pitch``); ``clen_m`` for a camera length read from the data
        file.  None where a panel's camera length is unknown.  (The camera length alone read
        -0.473 m for CrystFEL's CSPAD example geometry, whose coffset is 0.573 m.)"""
        try:
            clens = self.panel_clens(clen_m)
        except GeometryError:
            return None
        if not clens:
            return None
        return float(np.mean([c + float(p.coffset_m or 0.0)
                              for c, p in zip(clens, self.panels, strict=True)]))

    def panel_planes(self, clen_m: float | None = None, *, default_clen_m: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each panel's plane in metres, CrystFEL lab frame: ``(origins, fs_vecs, ss_vecs)``, each
        ``(n_panels, 3)``; the origin is the outer corner of pixel (0, 0) and a pixel centre lies
        at ``origin + (fs + 0.5) * fs_vec + (ss + 0.5) * ss_vec``.  Camera lengths as
        :meth:`panel_clens`."""
        clens = self.panel_clens(clen_m, default_clen_m=default_clen_m)
        origins = np.array([[p.corner_x / p.res, p.corner_y / p.res, clen + p.coffset_m]
                            for p, clen in zip(self.panels, clens, strict=True)])
        fs_vecs = np.array([np.asarray(p.fs, dtype=float) / p.res for p in self.panels])
        ss_vecs = np.array([np.asarray(p.ss, dtype=float) / p.res for p in self.panels])
        return origins, fs_vecs, ss_vecs

    def _placement(self, clen_m: float | None) -> np.ndarray:
        """Per panel: corner (x, y, z) in pixels, fs (3), ss (3), res -> array (n_panels, 10)."""
        table = np.empty((self.n_panels, 10))
        for i, (p, clen) in enumerate(zip(self.panels, self.panel_clens(clen_m), strict=True)):
            table[i, 0:3] = (p.corner_x, p.corner_y, (clen + p.coffset_m) * p.res)
            table[i, 3:6] = p.fs
            table[i, 6:9] = p.ss
            table[i, 9] = p.res
        return table

    def _per_panel(self, index: np.ndarray, names: tuple[str, ...],
                   strict: bool = False) -> list[np.ndarray]:
        if strict:
            _check_indices(index, self.n_panels)
        values = []
        for name in names:
            column = np.array([getattr(p, name) for p in self.panels] + [0], dtype=float)
            values.append(column[np.where(index >= 0, index, len(self.panels))])
        return values

    # ---- output ------------------------------------------------------------------------------

    def to_text(self, **extra_keys: Any) -> str:
        """``.geom`` text CrystFEL 0.10 to 0.12 accept (see :func:`geometry_text`).

        ``extra_keys`` set or replace global keys (``peak_list="/entry_1/result_1"``); a key given
        as ``None`` is left out.  A panel key given here applies to every panel.
        """
        return geometry_text(self, **extra_keys)


#: CrystFEL's lab frame has +z along the beam, DIALS' the beam along -z, both +y up: a half turn
#: about y maps one onto the other (and back: it is its own inverse).
CRYSTFEL_TO_DIALS = np.array([-1.0, 1.0, -1.0])


def crystfel_to_dials(vector: Any) -> tuple[float, float, float]:
    """A CrystFEL lab vector in DIALS' lab frame, or a DIALS one in CrystFEL's."""
    x, y, z = CRYSTFEL_TO_DIALS * np.asarray(vector, dtype=float)
    return (float(x), float(y), float(z))


def _check_indices(index: np.ndarray, n: int) -> None:
    if np.any((index < 0) | (index >= n)):
        raise IndexError(f"panel index out of range 0..{n - 1}")


def _apply_bad_region(good: np.ndarray, panel: Panel, region: BadRegion) -> None:
    if region.panel is not None and region.panel != panel.name:
        return
    if region.kind == "fs_ss":
        assert region.min_fs is not None and region.max_fs is not None
        assert region.min_ss is not None and region.max_ss is not None
        f0 = max(int(math.ceil(region.min_fs)) - panel.min_fs, 0)
        f1 = min(int(math.floor(region.max_fs)) - panel.min_fs, panel.width - 1)
        s0 = max(int(math.ceil(region.min_ss)) - panel.min_ss, 0)
        s1 = min(int(math.floor(region.max_ss)) - panel.min_ss, panel.height - 1)
        if f0 <= f1 and s0 <= s1:
            good[s0:s1 + 1, f0:f1 + 1] = False
        return
    ss_idx, fs_idx = np.mgrid[0:panel.height, 0:panel.width]
    a, b = fs_idx + 0.5, ss_idx + 0.5  # pixel centres measured from the corner
    x = panel.corner_x + a * panel.fs[0] + b * panel.ss[0]
    y = panel.corner_y + a * panel.fs[1] + b * panel.ss[1]
    good &= ~((x >= region.min_x) & (x <= region.max_x) & (y >= region.min_y)
              & (y <= region.max_y))


# --------------------------------------------------------------------------------------------
# writing (CrystFEL 0.10 to 0.12 rules, from the crystfel_geometry manual page and its parser)
# --------------------------------------------------------------------------------------------

#: Keys CrystFEL 0.11+ takes only at top level (``clen`` too: a per-panel clen is refused).
TOP_LEVEL_KEYS = ("photon_energy", "wavelength", "electron_voltage", "bandwidth", "clen",
                  "detector_shift_x", "detector_shift_y", "peak_list", "peak_list_type")
BEAM_KEYS = ("photon_energy", "wavelength", "electron_voltage")
#: Panel keys this writer takes from the resolved :class:`Panel` fields.
_RESOLVED_WRITTEN = ("res", "coffset", "adu_per_photon", "adu_per_eV", "max_adu", "no_index",
                     "mask_edge_pixels")
#: Panel keys 0.10+ parses but ignores with a warning: never written.
DROPPED_PANEL_KEYS = frozenset({"badrow_direction"})
_MASK_KEY = re.compile(r"mask\d_(data|file|goodbits|badbits)$")
_UNIT_DEFAULTS = {"wavelength": "m", "electron_voltage": "V"}


def is_panel_key(key: str) -> bool:
    """A key CrystFEL treats as a panel property (a default for later panels at top level)."""
    return key in PANEL_KEYS or _is_dim(key) or bool(_MASK_KEY.fullmatch(key))


def _beam_line(keys: dict[str, str]) -> str | None:
    """The one wavelength line CrystFEL allows; wavelength/electron_voltage need their unit."""
    present = [k for k in keys if k in BEAM_KEYS]
    if not present:
        return None
    key = present[-1]  # the parser keeps the last one given
    value = keys[key]
    if key in _UNIT_DEFAULTS and len(value.split()) == 1 and not value.startswith("/"):
        value = f"{value} {_UNIT_DEFAULTS[key]}"
    return f"{key} = {value}"


def _clen_and_offsets(geometry: Geometry, keys: dict[str, str]) -> tuple[str | None, list[float]]:
    """One top-level camera length, folding per-panel distances into each panel's coffset."""
    offsets = [p.coffset_m for p in geometry.panels]
    if "clen" in keys and keys["clen"] != (geometry.keys.get("clen")):
        return keys["clen"], offsets  # set by the caller for every panel
    paths = {p.clen_path for p in geometry.panels if p.clen_path is not None}
    if paths:
        if len(paths) > 1 or any(p.clen_m is not None for p in geometry.panels):
            raise GeometryError(geometry.path, "panels take their camera length from different "
                                "places (HDF5 paths or numbers); CrystFEL 0.11+ allows one "
                                "top-level clen")
        return paths.pop(), offsets
    lengths = [p.clen_m for p in geometry.panels]
    known = [v for v in lengths if v is not None]
    if not known:
        return keys.get("clen"), offsets
    base = float(known[0])  # a panel without one takes the top-level clen, as in 0.11+
    offsets = [c + (float(v) - base if v is not None else 0.0)
               for c, v in zip(offsets, lengths, strict=True)]
    return f"{base!r} m", offsets


def _resolved_value(panel: Panel, key: str, coffset: float) -> str | None:
    if key == "coffset":
        return None if coffset == 0 else repr(float(coffset))
    if key == "no_index":
        return "1" if panel.no_index else None
    if key == "mask_edge_pixels":
        return str(panel.mask_edge_pixels) if panel.mask_edge_pixels else None
    value = getattr(panel, key)
    return None if value is None else repr(float(value))


def _split_bad_region(region: BadRegion, geometry: Geometry) -> list[BadRegion]:
    """fs/ss regions as 0.10+ needs them: one panel each, inside that panel's bounds."""
    if region.kind != "fs_ss":
        return [region]
    assert region.min_fs is not None and region.max_fs is not None
    assert region.min_ss is not None and region.max_ss is not None
    panels = ([geometry.panel_by_name(region.panel)] if region.panel is not None
              else geometry.panels)
    out = []
    for panel in panels:
        bounds = (max(region.min_fs, panel.min_fs), min(region.max_fs, panel.max_fs),
                  max(region.min_ss, panel.min_ss), min(region.max_ss, panel.max_ss))
        if bounds[0] > bounds[1] or bounds[2] > bounds[3]:
            continue  # touches no pixel of this panel
        name = region.name if len(panels) == 1 else f"{region.name}_{panel.name}"
        out.append(replace(region, name=name, panel=panel.name, min_fs=bounds[0],
                           max_fs=bounds[1], min_ss=bounds[2], max_ss=bounds[3]))
    return out


def _mask_lines(panel: Panel, keys: dict[str, str], overridden: frozenset[str]
                ) -> dict[str, str]:
    """A panel's masks 0-7 as :meth:`Geometry.panel_masks` reads them, one name per field:
    mask 0 under its pre-0.10 names (every CrystFEL version reads them), masks 1-7 as
    ``maskN_*``.  Written from the resolved values, so a top-level mask that changed between
    panels, or a panel without the mask the others have, comes out as it was read."""
    fields = _resolve_mask_fields(panel.extra, keys, overridden)
    return {(_MASK0_LEGACY[f] if n == 0 else f"mask{n}_{f}"): value
            for (n, f), value in sorted(fields.items(),
                                        key=lambda item: (item[0][0],
                                                          _MASK_FIELDS.index(item[0][1])))}


def geometry_text(geometry: Geometry, **extra_keys: Any) -> str:
    """``.geom`` text following CrystFEL's rules for 0.10 to 0.12 (``man crystfel_geometry``).

    A top-level key applies only to panels defined after it, so every global comes first: the
    wavelength (exactly one of photon_energy/wavelength/electron_voltage), one top-level ``clen``
    (per-panel distances are folded into ``coffset``), the peak list, ``rigid_group*`` lines
    (0.10's; 0.11+ ignores them), then each panel property shared by all panels (data, dims,
    gain, masks, flags, res).  Panels follow with their position and whatever differs between
    them; fs/ss bad regions name one panel each and stay inside it.  ``group_*`` lines (the
    0.11+ hierarchy) come last, each after its members: 0.11+ looks a group's members up when
    it reads the line (a panel is a group of its own from its first line on), so groups before
    the panels made it refuse the file ("Unknown panel group").  Only a geometry written for
    0.11+ has them (0.10 knows no ``group_*`` key).  ``max_adu`` is written only where the
    geometry has one.
    Reading the text back gives the same pixels, placement, masks and globals.
    """
    keys = {k: str(v) for k, v in geometry.keys.items()}
    for key, value in extra_keys.items():
        keys.pop(key, None)
        if value is not None:
            keys[key] = str(value)
    overridden = {k for k in extra_keys if is_panel_key(k)}
    lines = ["; CrystFEL geometry (0.10-0.12 syntax) written by peaknet-xtal"]
    beam = _beam_line(keys)
    if beam is not None:
        lines.append(beam)
    clen, offsets = _clen_and_offsets(geometry, keys)
    if clen is not None:
        lines.append(f"clen = {clen}")
    lines += [f"{k} = {keys[k]}" for k in TOP_LEVEL_KEYS
              if k in keys and k not in BEAM_KEYS and k != "clen"]
    groups = [k for k in keys if k.startswith(("group_", "rigid_group"))]
    lines += [f"{k} = {keys[k]}" for k in groups if k.startswith("rigid_group")]
    unknown = [k for k in keys if k not in TOP_LEVEL_KEYS and k not in groups
               and not is_panel_key(k)]
    lines += [f"; not a CrystFEL 0.10-0.12 key, kept as a comment: {k} = {keys[k]}"
              for k in unknown]

    # per-panel values of every panel property, then the shared ones go to the top
    table: list[dict[str, str]] = []
    free_keys = [k for k in keys if is_panel_key(k) and k not in _RESOLVED_PANEL_KEYS
                 and k not in DROPPED_PANEL_KEYS and not _is_dim(k) and _mask_field(k) is None]
    extra_names: list[str] = []
    for panel in geometry.panels:
        for k in panel.extra:
            if (k not in extra_names and k not in DROPPED_PANEL_KEYS
                    and _mask_field(k) is None and is_panel_key(k)):
                extra_names.append(k)
    mask_overrides = frozenset(k for k in overridden if _mask_field(k) is not None)
    for panel, coffset in zip(geometry.panels, offsets, strict=True):
        row: dict[str, str] = {}
        if any(k in overridden for k in keys if _is_dim(k)):
            row.update({k: keys[k] for k in keys if _is_dim(k)})
        else:
            row.update({f"dim{i}": d for i, d in enumerate(panel.dims)})
        for key in _RESOLVED_WRITTEN:
            value = keys[key] if key in overridden else _resolved_value(panel, key, coffset)
            if value is not None:
                row[key] = value
        for key in dict.fromkeys(free_keys + extra_names):
            if key in overridden:
                value = keys.get(key)
            else:
                value = panel.extra.get(key, keys.get(key))
            if value is not None:
                row[key] = value
        row.update(_mask_lines(panel, keys, mask_overrides))
        table.append(row)
    if any(r.get("adu_per_photon") is not None for r in table):  # one gain unit per panel
        for r in table:
            if "adu_per_photon" in r:
                r.pop("adu_per_eV", None)
    shared: dict[str, str] = {}
    if table:
        for key in dict.fromkeys(k for r in table for k in r):
            values = {r.get(key) for r in table}
            if len(values) == 1 and None not in values:
                shared[key] = values.pop()  # type: ignore[assignment]
    lines += [""] + [f"{k} = {v}" for k, v in shared.items()]
    for panel, row in zip(geometry.panels, table, strict=True):
        n = panel.name
        lines += ["", f"{n}/min_fs = {panel.min_fs}", f"{n}/max_fs = {panel.max_fs}",
                  f"{n}/min_ss = {panel.min_ss}", f"{n}/max_ss = {panel.max_ss}",
                  f"{n}/fs = {format_vector(panel.fs)}", f"{n}/ss = {format_vector(panel.ss)}",
                  f"{n}/corner_x = {panel.corner_x!r}", f"{n}/corner_y = {panel.corner_y!r}"]
        lines += [f"{n}/{k} = {v}" for k, v in row.items() if k not in shared]
        lines += [f"; not a CrystFEL 0.10-0.12 key, kept as a comment: {n}/{k} = {v}"
                  for k, v in panel.extra.items() if not is_panel_key(k)]
    for region in geometry.bad_regions:
        for part in _split_bad_region(region, geometry):
            lines.append("")
            lines += part.to_lines()
    hierarchy = [f"{k} = {keys[k]}" for k in groups if k.startswith("group_")]
    if hierarchy:  # in file order: a 0.11+ geometry defines each group after its members
        lines += [""] + hierarchy
    return "\n".join(lines) + "\n"


def _gain_of(adu_per_photon: float | None, adu_per_eV: float | None,
             photon_energy_eV: float | None) -> float | None:
    if adu_per_photon is not None and adu_per_photon > 0:
        return float(adu_per_photon)
    if adu_per_eV is not None and adu_per_eV > 0 and photon_energy_eV:
        return float(adu_per_eV * photon_energy_eV)
    return None


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------

_Entry = tuple[str, int]  # (raw value, line number)
#: camera lengths (clen + coffset, metres) outside this range are warned about: CrystFEL takes
#: any number, but no diffraction experiment puts its detector nearer than 1 cm or beyond 10 m
_PLAUSIBLE_CLEN_M = (0.01, 10.0)


class _Parser:
    """One pass over the lines, collecting raw values; resolution happens at the end."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.geometry = Geometry(path=path)
        self.defaults: dict[str, _Entry] = {}
        self.panels: dict[str, dict[str, _Entry]] = {}
        self.panel_lines: dict[str, int] = {}
        self.explicit: dict[str, set[str]] = {}
        self.bad: dict[str, dict[str, _Entry]] = {}
        self.bad_lines: dict[str, int] = {}
        self.global_lines: dict[str, int] = {}
        self.clen_lines: dict[str, int] = {}
        #: the first top-level panel default since the last new panel (key, line): one left
        #: at the end of the file applies to no panel
        self.pending_default: tuple[str, int] | None = None
        #: ``group_NAME = a,b`` lines: (name, members, line, panels and groups known there)
        self.groups: list[tuple[str, list[str], int, set[str]]] = []
        #: keys CrystFEL does not know (it says "Unrecognised field" and goes on): (key, line)
        self.unknown: list[tuple[str, int]] = []

    def fail(self, line: int | None) -> _Fail:
        return _Fail(self.path, line)

    def warn(self, line: int | None, message: str) -> None:
        """Something CrystFEL accepts but that cannot be meant: said once, with file and line,
        in the way an error would be (``Geometry.warnings``, logged by parse_geometry)."""
        text = str(GeometryError(self.path, message, line=line))
        if text not in self.geometry.warnings:
            self.geometry.warnings.append(text)

    def _check_repeat(self, owner: str, sub: str, value: str, number: int,
                      given: dict[str, _Entry]) -> None:
        """``p0/corner_x`` twice for one panel (or one bad region): CrystFEL keeps the last
        value without a word (``flag_*`` values it collects instead); a repeat with another
        value is most likely an edit gone wrong."""
        if sub not in given or sub not in self.explicit.get(owner, {sub}):
            return
        before, at = given[sub]
        if before == value:
            return
        if sub in {"flag_lessthan", "flag_morethan", "flag_equal"}:
            self.warn(number, f"{owner}/{sub} given twice ({before!r} on line {at}, {value!r} "
                              f"here): CrystFEL applies both values, this project only the "
                              "last; give one")
            return
        self.warn(number, f"{owner}/{sub} given twice ({before!r} on line {at}, {value!r} "
                          f"here): CrystFEL takes the last one, {value!r}, as this reader "
                          "does; delete the line that is wrong")

    def feed(self, raw: str, number: int) -> None:
        text = raw.split(";", 1)[0].strip()
        if not text:
            return
        if "=" not in text:
            raise self.fail(number)(f"expected 'key = value', got {raw.strip()!r}")
        key, value = (part.strip() for part in text.split("=", 1))
        if not key or not value:
            raise self.fail(number)(f"expected 'key = value', got {raw.strip()!r}")
        if any(c.isspace() for c in key):
            raise self.fail(number)(f"malformed key {key!r}")
        if "/" not in key:
            self._global(key, value, number)
            return
        name, _, sub = key.partition("/")
        if not name or not sub or "/" in sub:
            raise self.fail(number)(f"malformed key {key!r} (expected 'panel/key')")
        if name.startswith("bad"):
            if sub not in _BAD_KEYS:
                raise self.fail(number)(f"unknown bad-region key {key!r}")
            self.bad_lines.setdefault(name, number)
            self._check_repeat(name, sub, value, number, self.bad.get(name, {}))
            self.bad.setdefault(name, {})[sub] = (value, number)
            return
        _check_mask_key(sub, value, self.fail(number))
        if name not in self.panels:
            self.panels[name] = dict(self.defaults)
            self.panel_lines[name] = number
            self.explicit[name] = set()
            self.pending_default = None
        self._check_repeat(name, sub, value, number, self.panels[name])
        if not is_panel_key(sub):
            self.unknown.append((key, number))
        self.panels[name].pop(sub, None)  # dict order = order of the last assignments
        self.panels[name][sub] = (value, number)
        self.explicit[name].add(sub)

    def _global(self, key: str, value: str, number: int) -> None:
        self.geometry.keys.pop(key, None)  # keep file order of the last assignment
        self.geometry.keys[key] = value
        self.global_lines[key] = number
        _check_mask_key(key, value, self.fail(number))
        if is_panel_key(key):
            self.defaults.pop(key, None)
            self.defaults[key] = (value, number)
            if key not in TOP_LEVEL_KEYS and self.pending_default is None:
                self.pending_default = (key, number)
        if key.startswith("group_"):
            known = set(self.panels) | {g[0] for g in self.groups}
            members = [m.strip() for m in value.split(",")]
            self.groups.append((key[len("group_"):], members, number, known))
            return
        if key.startswith("rigid_group"):
            return
        if key not in TOP_LEVEL_KEYS and not is_panel_key(key):
            self.unknown.append((key, number))
        self._set_global_field(key, value, self.fail(number))

    def _set_global_field(self, key: str, value: str, fail: _Fail) -> None:
        g = self.geometry
        if key == "clen":
            g.clen_m, g.clen_path = _length_or_path(value, key, fail)
        elif key in _BEAM_UNITS:
            # the last of photon_energy / wavelength / electron_voltage wins, number or path
            g.photon_energy_path = g.photon_energy_path_unit = g.photon_energy_eV = None
            if value.startswith("/"):
                g.photon_energy_path, g.photon_energy_path_unit = _beam_path(value, key, fail)
            elif key == "photon_energy":
                g.photon_energy_eV = _positive(_number_with_unit(
                    value, key, {"eV": 1.0, "keV": 1e3}, "eV", fail), key, value, fail)
            elif key == "wavelength":
                metres = _positive(_number_with_unit(value, key, {"m": 1.0, "A": 1e-10}, "m",
                                                     fail), key, value, fail)
                g.photon_energy_eV = HC_EV_A / (metres * 1e10)
            else:
                volts = _positive(_number_with_unit(value, key, {"V": 1.0, "kV": 1e3}, "V",
                                                    fail), key, value, fail)
                g.photon_energy_eV = HC_EV_A / _electron_wavelength_A(volts)
        elif key in {"adu_per_photon", "adu_per_eV", "bandwidth", "coffset", "res", "max_adu"}:
            number = _float(value, key, fail)
            if key in {"adu_per_photon", "adu_per_eV", "bandwidth"}:
                setattr(g, key, number)
        elif key in {"data", "peak_list", "peak_list_type"}:
            setattr(g, key, value)
        elif key in {"mask", "mask0_data"}:
            g.mask = value
        elif key in {"mask_file", "mask0_file"}:
            g.mask_file = value
        elif key in {"mask_good", "mask0_goodbits"}:
            g.mask_good = _bits(value, key, fail)
        elif key in {"mask_bad", "mask0_badbits"}:
            g.mask_bad = _bits(value, key, fail)
        elif _is_dim(key):
            _dim_value(value, key, fail)

    def finish(self) -> Geometry:
        g = self.geometry
        if g.photon_energy_eV is not None and g.photon_energy_eV > 0:
            g.wavelength_A = HC_EV_A / g.photon_energy_eV
        g.panels = [self._panel(name, values) for name, values in self.panels.items()]
        if g.panels:
            g.dims = g.panels[0].dims
        names = {p.name for p in g.panels}
        g.bad_regions = [self._bad_region(name, values, names)
                         for name, values in self.bad.items()]
        if not g.panels:
            raise self.fail(None)("no panels defined (no 'name/min_fs = ...' lines)")
        self._check_no_effect()
        self._check_groups()
        self._check_rigid_groups()
        g.data = self._one_dataset()
        self._check_placeholders(g)
        self._check_overlaps(g.panels)
        self._check_distance(g.panels)
        self._check_plausible_distance(g.panels)
        for key, line in self.unknown:
            self.warn(line, f"'{key}' is not a CrystFEL geometry key (CrystFEL says "
                            f"\"Unrecognised field '{key.rpartition('/')[2]}'\" and ignores "
                            "it): ignored here too, and written to an output geometry only as "
                            "a comment; check its spelling")
        return g

    def _check_rigid_groups(self) -> None:
        """``rigid_group_NAME = a,b`` and ``rigid_group_collection_NAME = g1,g2``: CrystFEL
        0.10 (and 0.9) resolve them after the last line and refuse the whole file over a member
        that is no panel ("Cannot add panel to rigid group / Panel not found") or no rigid group
        ("Cannot add rigid group to collection"); 0.11+ ignores rigid_group lines.  A file
        valid for 0.11 is read, with a warning: the line is written to output geometries as
        it stands, and 0.10 would refuse them."""
        keys = self.geometry.keys
        rigid = {k[len("rigid_group_"):] for k in keys
                 if k.startswith("rigid_group") and not k.startswith("rigid_group_collection")}
        for key, value in keys.items():
            if not key.startswith("rigid_group"):
                continue
            collection = key.startswith("rigid_group_collection")
            known, what = ((rigid, "rigid group") if collection else (set(self.panels), "panel"))
            says = ("Cannot add rigid group to collection" if collection
                    else "Cannot add panel to rigid group")
            for member in (m.strip() for m in value.split(",")):
                if member and member not in known:
                    self.warn(self.global_lines.get(key),
                              f"{key}: unknown {what} {member!r} (CrystFEL 0.10 refuses the "
                              f"file: \"{says}\"; 0.11+ ignores rigid groups; known {what}s: "
                              f"{', '.join(sorted(known)) or 'none'}): correct or delete it")

    def _check_plausible_distance(self, panels: list[Panel]) -> None:
        """A camera length CrystFEL takes but no experiment has (``clen = 0.1 mm``, or
        ``clen = 70`` meant as mm but read as metres) puts every 1/d far off: a warning naming
        the line, since the file itself is valid."""
        for p in panels:
            if p.clen_m is None:
                continue
            distance = p.clen_m + p.coffset_m
            if not (0 < distance < _PLAUSIBLE_CLEN_M[0] or distance > _PLAUSIBLE_CLEN_M[1]):
                continue
            line = self.clen_lines.get(p.name)
            raw = (self.panels[p.name].get("clen") or (self.geometry.keys.get("clen", ""), 0))[0]
            hint = ""
            if len(raw.split()) == 1 and distance > _PLAUSIBLE_CLEN_M[1]:
                hint = f" (a number without unit is in metres: '{raw} mm' would be millimetres)"
            self.warn(line, f"clen = {raw!r} puts panel {p.name} {distance:g} m from the sample, "
                            f"outside any plausible camera length ({_PLAUSIBLE_CLEN_M[0] * 1e3:g} "
                            f"mm to {_PLAUSIBLE_CLEN_M[1]:g} m); CrystFEL accepts it, but every "
                            f"resolution would be far off: check the number and its unit{hint}")
            return

    def _check_placeholders(self, g: Geometry) -> None:
        """A mask or saturation map location takes its placeholders' values from the event of
        the data path (``/%/mask`` beside ``data = /%/data``): one with more '%' than the data
        path has none for the rest, and CrystFEL refuses the file."""
        n = (g.data or "/data/data").count("%")
        locations = [(f"mask{spec.index} location {spec.data}", spec.data)
                     for specs in g.panel_masks() for spec in specs if spec.data]
        locations += [(f"saturation_map {value}", value) for key, value in g.keys.items()
                      if key == "saturation_map"]
        locations += [(f"{p.name}/saturation_map {p.extra['saturation_map']}",
                       p.extra["saturation_map"]) for p in g.panels if "saturation_map" in p.extra]
        for what, value in locations:
            if value.count("%") > n:
                raise self.fail(None)(f"{what} has more '%' placeholders than the data path "
                                      f"{g.data or '/data/data'} ({n}); CrystFEL refuses this")

    def _check_no_effect(self) -> None:
        """A top-level panel property applies to the panels defined after it; one after the
        last panel applies to none, and CrystFEL refuses the file rather than ignore it."""
        if self.pending_default is not None:
            key, line = self.pending_default
            raise self.fail(line)(
                f"'{key} = {self.geometry.keys.get(key, '')}' comes after the last panel: a "
                f"top-level {key} applies only to panels defined after it, so here it has no "
                "effect (CrystFEL refuses such a file); move it above the panels it is for")

    def _check_groups(self) -> None:
        """``group_NAME = a,b``: CrystFEL looks each member up as it reads the line (a panel is
        a group of its own from its first line on) and refuses an unknown one ("Unknown panel
        group"), a member named twice, or a group name already taken."""
        for name, members, line, known in self.groups:
            fail = self.fail(line)
            if name in known:
                raise fail(f"group_{name}: there is already a panel or group named {name!r}")
            if not any(members):
                raise fail(f"group_{name} has no members")
            for i, member in enumerate(members):
                if member in members[:i]:
                    raise fail(f"group_{name}: member {member!r} is named twice")
                if member in known:
                    continue
                if member in self.panels or any(g[0] == member for g in self.groups):
                    raise fail(f"group_{name}: {member!r} is defined only further down; "
                               "CrystFEL reads a group's members when it reads the line, so a "
                               "group goes after its members")
                raise fail(f"group_{name}: unknown panel or group {member!r}")

    def _one_dataset(self) -> str | None:
        """The one dataset all panels read (``data``, their own or the top-level default in
        force when each was defined).  Panels in several datasets are refused: the readers,
        the CXI output and its virtual dataset, and the written geometry all place panels in
        one array, so each panel would take its pixels from the wrong dataset, or two panels
        sharing fs/ss ranges would seem to overlap."""
        first: tuple[str, str | None, int | None] | None = None
        for name, values in self.panels.items():
            data, line = values.get("data", (None, None))
            if first is None:
                first = (name, data, line)
                continue
            if data != first[1]:
                def say(dataset: str | None, at: int | None) -> str:
                    if dataset is None:
                        return "no 'data' key (the default dataset)"
                    return f"{dataset} (line {at})"

                raise self.fail(line if line is not None else self.panel_lines[name])(
                    f"panel {name} reads {say(data, line)} but panel {first[0]} reads "
                    f"{say(first[1], first[2])}: panels in several datasets are not "
                    "supported; put all panels in one dataset ('data = ...' once, above the "
                    "panels), or stack them in one dataset with a fixed index per panel (e.g. "
                    "'dim0 = %', 'dim2 = ss', 'dim3 = fs', 'p0/dim1 = 0', 'p1/dim1 = 1')")
        return first[1] if first is not None else None

    def _check_distance(self, panels: list[Panel]) -> None:
        """A detector wholly at or behind the sample is a sign slip in ``clen`` (every 1/d would
        come out as 2/lambda).  Some panels behind it are fine: curved detectors wrap around."""
        distances = {p.name: p.clen_m + p.coffset_m for p in panels if p.clen_m is not None}
        if distances and all(d <= 0 for d in distances.values()):
            first = next(iter(distances))
            raise self.fail(self.clen_lines.get(first))(
                f"camera length clen + coffset = {distances[first]:g} m: every "
                "panel lies at or behind the sample; the distance must be positive")

    def _check_overlaps(self, panels: list[Panel]) -> None:
        """Two panels reading the same raw pixels would report every peak there twice and cut
        labels from the wrong pixels: an error naming both panels."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, p in enumerate(panels):
            fixed = tuple(d for d in p._data_dims() if d not in {"ss", "fs"})
            groups.setdefault(fixed, []).append(i)
        for members in groups.values():
            if len(members) < 2:
                continue
            box = np.array([(panels[i].min_fs, panels[i].max_fs, panels[i].min_ss,
                             panels[i].max_ss) for i in members])
            hit = ((box[:, None, 0] <= box[None, :, 1]) & (box[None, :, 0] <= box[:, None, 1])
                   & (box[:, None, 2] <= box[None, :, 3]) & (box[None, :, 2] <= box[:, None, 3]))
            hit = np.triu(hit, k=1)
            if hit.any():
                a, b = (members[int(k)] for k in np.argwhere(hit)[0])
                first, second = panels[a], panels[b]
                raise self.fail(second.line)(
                    f"panel {second.name} (fs {second.min_fs}-{second.max_fs}, ss "
                    f"{second.min_ss}-{second.max_ss}) overlaps panel {first.name} (fs "
                    f"{first.min_fs}-{first.max_fs}, ss {first.min_ss}-{first.max_ss}) in the "
                    "data: each raw pixel may belong to one panel only")

    def _panel(self, name: str, values: dict[str, _Entry]) -> Panel:
        line = self.panel_lines[name]
        for key in ("min_fs", "max_fs", "min_ss", "max_ss", "corner_x", "corner_y", "res"):
            if key in values:  # a bad number is reported before anything missing
                convert = _float if key in {"corner_x", "corner_y", "res"} else _int
                convert(values[key][0], f"{name}/{key}", self.fail(values[key][1]))
        for key in _REQUIRED_PANEL_KEYS:
            if key not in values:
                typo = difflib.get_close_matches(key, [k for k in values if not is_panel_key(k)],
                                                 n=1, cutoff=0.8)
                if typo:  # CrystFEL says "Unrecognised field", then that the key is missing
                    raise self.fail(values[typo[0]][1])(
                        f"panel {name} has no {key}: '{name}/{typo[0]}' is not a geometry "
                        f"key (a typo for '{name}/{key}'?)")
                raise self.fail(line)(f"panel {name} has no {key}")
        ints = {k: _int(values[k][0], f"{name}/{k}", self.fail(values[k][1]))
                for k in ("min_fs", "max_fs", "min_ss", "max_ss")}
        if ints["max_fs"] < ints["min_fs"] or ints["max_ss"] < ints["min_ss"]:
            raise self.fail(values["max_fs"][1])(
                f"panel {name}: max_fs/max_ss must not be below min_fs/min_ss")

        def number(key: str, default: float | None = None) -> float | None:
            if key not in values:
                return default
            return _float(values[key][0], f"{name}/{key}", self.fail(values[key][1]))

        def vector(key: str, default: str) -> np.ndarray:
            raw, at = values.get(key, (default, line))
            return parse_vector(raw, f"{name}/{key}", self.fail(at))

        res = number("res")
        assert res is not None
        if res <= 0:
            raise self.fail(values["res"][1])(f"panel {name}: res must be positive")
        # a top-level clen applies to every panel wherever it stands (CrystFEL 0.11+ has no
        # other); a panel's own (older files) still wins
        clen_m, clen_path = (self.geometry.clen_m, self.geometry.clen_path)
        if "clen" in values:
            clen_m, clen_path = _length_or_path(values["clen"][0], f"{name}/clen",
                                                self.fail(values["clen"][1]))
        coffset = 0.0
        if "coffset" in values:
            coffset = _number_with_unit(values["coffset"][0], f"{name}/coffset",
                                        {"m": 1.0, "mm": 1e-3}, "m",
                                        self.fail(values["coffset"][1]))
        if clen_m is not None:
            self.clen_lines[name] = (values["clen"][1] if "clen" in values
                                     else self.global_lines.get("clen", 0))
        no_index = False
        if "no_index" in values:
            no_index = _bool(values["no_index"][0], f"{name}/no_index",
                             self.fail(values["no_index"][1]))
        edge = 0
        if "mask_edge_pixels" in values:
            edge = _int(values["mask_edge_pixels"][0], f"{name}/mask_edge_pixels",
                        self.fail(values["mask_edge_pixels"][1]))
        dims = _dims_from({k: v for k, v in values.items() if _is_dim(k)}, self.fail(line))
        extra = {k: v for k, (v, _) in values.items() if k in self.explicit[name]
                 and k not in _RESOLVED_PANEL_KEYS and not _is_dim(k)}
        self._settle_masks(name, values, extra)
        fs, ss = vector("fs", "x"), vector("ss", "y")
        if np.linalg.norm(np.cross(fs, ss)) <= 1e-6 * np.linalg.norm(fs) * np.linalg.norm(ss):
            raise self.fail(values.get("ss", ("", line))[1])(
                f"panel {name}: fs and ss are parallel, so the panel has no area")
        adu_per_photon, adu_per_eV = number("adu_per_photon"), number("adu_per_eV")
        for key, gain in (("adu_per_photon", adu_per_photon), ("adu_per_eV", adu_per_eV)):
            if gain is not None and gain <= 0:
                self.warn(values[key][1], self._where(name, key) + (
                    f" = {values[key][0]}: a detector gain must be positive; CrystFEL takes it "
                    "as is (its Poisson error estimates divide by it); this project ignores the "
                    "line, so the gain comes from another line of the geometry or, with none, "
                    "is estimated from the data"))
        max_adu = number("max_adu")
        if max_adu is not None and max_adu <= 0:
            self.warn(values["max_adu"][1], self._where(name, "max_adu") + (
                f" = {values['max_adu'][0]}: a saturation value at or below zero makes "
                "CrystFEL count every pixel above it as saturated (it rejects the peaks and "
                "reflections there); CrystFEL accepts it, and it is written to an output "
                "geometry as given: delete the line (CrystFEL advises against max_adu) or give "
                "the detector's real saturation value"))
        return Panel(
            name=name, **ints, fs=fs, ss=ss,
            corner_x=number("corner_x") or 0.0, corner_y=number("corner_y") or 0.0, res=res,
            clen_m=clen_m, clen_path=clen_path, coffset_m=coffset,
            adu_per_photon=adu_per_photon, adu_per_eV=adu_per_eV,
            max_adu=max_adu, no_index=no_index, mask_edge_pixels=edge, dims=dims,
            extra=extra, line=line,
        )

    def _where(self, panel: str, key: str) -> str:
        """``p0/max_adu``, or ``max_adu`` where the panel has it from a top-level line."""
        return f"{panel}/{key}" if key in self.explicit[panel] else key

    def _settle_masks(self, name: str, values: dict[str, _Entry], extra: dict[str, str]) -> None:
        """Make ``extra`` say the panel's masks exactly.  :meth:`Geometry.panel_masks` (and the
        writer) take a panel's own mask keys, else the top-level ones as they stand at the end
        of the file; a top-level mask that changes between panels applies, in CrystFEL, to the
        panels defined after each line only.  Where the two differ, the panel's value is put in
        its ``extra`` (an empty one: the panel has none).  Also refuses a mask 1-7 with a file
        or bits but no dataset (mask 0 alone has a default location)."""
        wanted: dict[tuple[int, str], _Entry] = {}
        for key, entry in values.items():
            where = _mask_field(key)
            if where is not None and (where not in wanted or entry[1] > wanted[where][1]):
                wanted[where] = entry
        resolved = _resolve_mask_fields(extra, self.geometry.keys)
        for where in sorted(set(wanted) | set(resolved)):
            value = wanted[where][0] if where in wanted else ""
            if resolved.get(where, "") != value:
                key = f"mask{where[0]}_{where[1]}"
                extra.pop(key, None)
                extra[key] = value  # last: it wins over any other name of the field
        for n in range(1, MAX_MASKS):
            if (n, "data") in wanted:
                continue
            given = [(f, wanted[(n, f)]) for f in _MASK_FIELDS if (n, f) in wanted
                     and (f == "file" or int(wanted[(n, f)][0], 0) != 0)]  # 0 bits: no effect
            if given:
                field_name, (_, at) = given[0]
                raise self.fail(at)(f"panel {name}: mask{n}_{field_name} without "
                                    f"mask{n}_data: mask {n} needs the dataset holding it")

    def _bad_region(self, name: str, values: dict[str, _Entry], panels: set[str]) -> BadRegion:
        line = self.bad_lines[name]
        fs_keys = ("min_fs", "max_fs", "min_ss", "max_ss")
        xy_keys = ("min_x", "max_x", "min_y", "max_y")
        has_fs = [k for k in fs_keys if k in values]
        has_xy = [k for k in xy_keys if k in values]
        if has_fs and has_xy:
            raise self.fail(line)(f"bad region {name} mixes fs/ss and x/y limits")
        keys = fs_keys if has_fs else xy_keys
        missing = [k for k in keys if k not in values]
        if missing:
            raise self.fail(line)(f"bad region {name} has no {', '.join(missing)}")
        bounds = {k: _float(values[k][0], f"{name}/{k}", self.fail(values[k][1])) for k in keys}
        for low, high in zip(keys[::2], keys[1::2], strict=True):
            if bounds[low] > bounds[high]:
                self.warn(values[high][1], f"bad region {name}: {low} = {values[low][0]} is "
                                           f"above {high} = {values[high][0]}, so the region "
                                           "covers no pixel (CrystFEL accepts it and masks "
                                           "nothing; so does this project); swap the two if "
                                           "the region is meant to be masked")
        panel = None
        if "panel" in values:
            panel, at = values["panel"]
            if not has_fs:
                raise self.fail(at)(f"bad region {name}: 'panel' needs fs/ss limits")
            if panel not in panels:
                raise self.fail(at)(f"bad region {name} names unknown panel {panel!r}")
        return BadRegion(name=name, kind="fs_ss" if has_fs else "xy", panel=panel, line=line,
                         **bounds)


def _is_dim(key: str) -> bool:
    return key.startswith("dim") and key[3:].isdigit()


def _dim_value(value: str, key: str, fail: _Fail) -> str:
    if value in {"%", "ss", "fs"} or value.isdigit():
        return value
    raise fail(f"{key} = {value!r}: expected %, ss, fs or a whole number")


def _dims_from(entries: dict[str, _Entry], fail: _Fail) -> list[str]:
    """``{"dim0": "%", "dim1": "ss", ...}`` -> ``["%", "ss", ...]``; default ``["ss", "fs"]``."""
    if not entries:
        return ["ss", "fs"]
    by_number = {int(k[3:]): (v, at) for k, (v, at) in entries.items()}
    dims = []
    for n in range(max(by_number) + 1):
        if n not in by_number:
            raise _Fail(fail.path, max(at for _, at in by_number.values()))(
                f"dim{n} is missing (dimensions {sorted(by_number)} given)")
        value, at = by_number[n]
        dims.append(_dim_value(value, f"dim{n}", _Fail(fail.path, at)))
    if dims.count("ss") != 1 or dims.count("fs") != 1 or dims.index("ss") > dims.index("fs"):
        at = max(at for _, at in by_number.values())
        raise _Fail(fail.path, at)(f"dimensions {dims}: need one ss before one fs")
    return dims


def parse_geometry(text: str, path: str | os.PathLike[str] | None = None) -> Geometry:
    """Parse ``.geom`` text; every problem raises GeometryError naming ``path`` and the line."""
    parser = _Parser(None if path is None else str(path))
    if text.startswith("\ufeff"):
        raise parser.fail(1)(
            "the file starts with a UTF-8 byte-order mark (BOM, bytes EF BB BF), which "
            "CrystFEL does not skip: it reads the mark as part of the first line ('Bad line in "
            "geometry file', or an unrecognised first key) and refuses the file; save it as "
            "UTF-8 without BOM (e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' FILE)")
    for number, raw in enumerate(text.splitlines(), start=1):
        parser.feed(raw, number)
    geometry = parser.finish()
    for message in geometry.warnings:
        if message not in _LOGGED:  # a geometry read by several parts of one run: said once
            _LOGGED.add(message)
            log.warning("%s", message)
    return geometry


#: warnings already logged in this process (see :func:`parse_geometry`)
_LOGGED: set[str] = set()


def read_geometry(path: str | os.PathLike[str]) -> Geometry:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise GeometryError(path, f"not a text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise GeometryError(path, f"cannot read: {exc.strerror or exc}") from None
    return parse_geometry(text, path)


def write_geometry(geometry: Geometry, path: str | os.PathLike[str], **extra_keys: Any) -> None:
    """Write ``geometry.to_text(**extra_keys)`` atomically (nothing half-written on a crash)."""
    write_text_atomic(path, geometry.to_text(**extra_keys))
