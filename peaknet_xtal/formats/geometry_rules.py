"""CrystFEL's own acceptance rules for a ``.geom`` (0.10 to 0.12), as a checker.

CrystFEL is not installable here, so the rules its geometry loader applies are restated from the
``crystfel_geometry(5)`` manual page and the 0.10-0.12 loader's behaviour, and every geometry
the project writes is checked against them in the tests.  :func:`crystfel_problems` returns one
line per problem; a line starting with ``warning:`` is something CrystFEL prints but accepts
(``max_adu``, ``badrow_direction``), anything else makes ``indexamajig`` refuse the file
("Failed to read detector geometry").  Given the HDF5 files the geometry will be used with, it
also checks that every dataset the geometry names exists there, as ``indexamajig`` needs.

The rules:
- a top-level panel property (``res``, ``data``, ``mask``, ``dim0``...) is a default for panels
  *first mentioned after it*; one after the last new panel has no effect and is refused;
- ``clen`` once, top level, before the panels (0.11+ refuses ``panel/clen``; 0.10 treats a top
  level clen as a panel default, so after the panels it would apply to none);
- exactly one of ``photon_energy`` / ``wavelength`` / ``electron_voltage``; the last two need
  their unit (m|A, V|kV), photon energy may have eV|keV;
- every panel: min/max fs/ss, corner_x/y, res, fs and ss directions, data, one gain
  (``adu_per_eV`` or ``adu_per_photon``), dimensions with one ss before one fs;
- masks: a mask file needs a mask dataset, good/bad bits need a mask; paths start with ``/``;
  mask and saturation-map paths have no more ``%`` than the data path;
- fs/ss directions are signed numbers in positional notation and x/y/z (no exponent: its
  ``e`` is an invalid character there);
- ``group_NAME = a,b`` (0.11+'s hierarchy; 0.10 knows no such key) names members already
  defined when the line is read: panels (each is a group of its own from its first line on)
  or earlier groups, none twice, and NAME is new;
- fs/ss bad regions name a panel (unless there is one) and lie inside it (file coordinates);
- ``rigid_group_NAME`` names panels, ``rigid_group_collection_NAME`` rigid groups, each of
  them defined somewhere in the file (0.10 refuses the file otherwise; 0.11+ ignores both);
- ``peak_list_type`` is auto, cxi or list3; unknown keys are reported as warnings (CrystFEL
  says "Unrecognised field" and goes on; a top-level one still counts as a panel default).
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

WARNING = "warning: "
_TOP_ONLY = ("detector_shift_x", "detector_shift_y", "clen", "photon_energy", "electron_voltage",
             "wavelength", "peak_list", "peak_list_type", "bandwidth")
_PANEL_FIELDS = frozenset({
    "min_fs", "max_fs", "min_ss", "max_ss", "corner_x", "corner_y", "adu_per_eV",
    "adu_per_photon", "data", "mask_edge_pixels", "mask_bad", "mask_good", "mask", "mask_file",
    "saturation_map", "saturation_map_file", "coffset", "res", "max_adu", "flag_equal",
    "flag_lessthan", "flag_morethan", "badrow_direction", "no_index", "fs", "ss",
})
#: masks are numbered 0 to 7 (CrystFEL keeps eight per panel and does not check the number)
_MASK_N = re.compile(r"mask([0-7])_(data|file|goodbits|badbits)$")
_ALIASES = {"mask": "mask0_data", "mask_file": "mask0_file", "mask_good": "mask0_goodbits",
            "mask_bad": "mask0_badbits"}
_BAD_FIELDS = frozenset({"min_x", "max_x", "min_y", "max_y", "min_fs", "max_fs", "min_ss",
                         "max_ss", "panel"})
_DIRECTION = re.compile(r"^([+-]?(\d+\.?\d*|\.\d+)[xyz]|[+-]?[xyz])+$")


def _is_panel_field(key: str) -> bool:
    return key in _PANEL_FIELDS or bool(_MASK_N.fullmatch(key)) or (
        key.startswith("dim") and key[3:].isdigit())


def _unknown(key: str) -> str:
    """The prefix of an unrecognised key's line: CrystFEL says "Unrecognised field" and goes
    on (a warning), but any ``mask...`` key goes to its mask parser, which refuses a wrong
    field name and writes past its eight masks for a number above 7 (an error)."""
    return "" if key.startswith("mask") else WARNING


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _bits(value: str) -> float:
    """Mask bits as C's strtod reads them (decimal or 0x hex); 0 when unreadable."""
    try:
        return float(int(value, 0))
    except ValueError:
        return _number(value) or 0.0


def crystfel_problems(text: str, h5_files: Sequence[str | os.PathLike[str]] = (),
                      ) -> list[str]:
    """Everything CrystFEL 0.10-0.12 would refuse (or warn about) in ``text``; [] when clean."""
    problems: list[str] = []
    defaults: dict[str, str] = {}
    panels: dict[str, dict[str, str]] = {}
    bad: dict[str, dict[str, str]] = {}
    top: dict[str, list[str]] = {}
    groups: set[str] = set()
    unused_defaults = False
    for raw in text.replace("\r", "\n").split("\n"):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            problems.append(f"bad line {line!r} (no '=')")
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if "/" not in key:
            top.setdefault(key, []).append(value)
            if key.startswith("group_"):
                _check_group(key[len("group_"):], value, panels, groups, problems)
                continue
            if key in _TOP_ONLY or key.startswith("rigid_group"):
                if key == "clen" and panels:
                    problems.append("clen comes after the first panel (0.10 applies a top-level "
                                    "clen only to panels defined after it)")
                continue
            if not _is_panel_field(key):
                # parse_field_for_panel(defaults): "Unrecognised field", not a refusal, but it
                # counts as a default set (so after the last panel it has "no effect")
                problems.append(f"{_unknown(key)}unrecognised top-level key {key!r}")
                unused_defaults = True
                continue
            defaults[_ALIASES.get(key, key)] = value
            unused_defaults = True
            continue
        name, _, field = key.partition("/")
        if name.startswith("bad"):
            if field not in _BAD_FIELDS:
                problems.append(f"{WARNING}unrecognised bad-region field {key!r}")
            bad.setdefault(name, {})[field] = value
            continue
        if name not in panels:
            panels[name] = dict(defaults)
            unused_defaults = False
        if field == "clen":
            problems.append(f"'{key}': 'clen' is a top-level property (0.11+)")
        elif not _is_panel_field(field):
            problems.append(f"{_unknown(field)}unrecognised panel field {key!r}")
        panels[name][_ALIASES.get(field, field)] = value
    if not panels:
        return problems + ["no panel descriptions"]
    if unused_defaults:
        problems.append("statements at the end of the file have no effect (they only apply to "
                        "subsequently-defined panels)")
    _check_globals(top, problems)
    _check_rigid_groups(top, panels, problems)
    for name, fields in panels.items():
        _check_panel(name, fields, problems)
    _check_bad_regions(bad, panels, problems)
    for path in h5_files:
        _check_h5(os.fspath(path), top, panels, problems)
    return problems


def _check_globals(top: dict[str, list[str]], problems: list[str]) -> None:
    beams = [k for k in ("photon_energy", "wavelength", "electron_voltage") if k in top]
    if not beams:
        problems.append("no wavelength (photon_energy, wavelength or electron_voltage)")
    if len(beams) > 1 or any(len(top[k]) > 1 for k in beams):
        problems.append(f"more than one wavelength line ({', '.join(beams)})")
    units = {"photon_energy": ("", "eV", "keV"), "wavelength": ("m", "A"),
             "electron_voltage": ("V", "kV")}
    for key in beams:
        parts = top[key][-1].split()
        unit = parts[1] if len(parts) == 2 else ""
        if len(parts) > 2 or unit not in units[key]:
            problems.append(f"{key} = {top[key][-1]!r}: unit must be one of "
                            f"{[u for u in units[key] if u]}")
        elif not parts[0].startswith("/") and (_number(parts[0]) is None
                                                or not _number(parts[0]) > 0):  # type: ignore
            problems.append(f"{key} = {top[key][-1]!r} is not a positive number or a path")
    if "clen" not in top:
        problems.append("no camera length (top-level clen)")
    elif len(top["clen"]) > 1:
        problems.append("clen given more than once")
    else:
        parts = top["clen"][0].split()
        if len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("m", "mm")) or (
                not parts[0].startswith("/") and _number(parts[0]) is None):
            problems.append(f"clen = {top['clen'][0]!r} is not a length in m/mm or a path")
    for value in top.get("peak_list_type", []):
        if value not in ("auto", "cxi", "list3"):
            problems.append(f"peak_list_type = {value!r} (auto, cxi or list3)")


def _check_rigid_groups(top: dict[str, list[str]], panels: dict[str, dict[str, str]],
                        problems: list[str]) -> None:
    """0.10 resolves ``rigid_group_NAME`` (panels) and ``rigid_group_collection_NAME`` (rigid
    groups) after the last line and refuses the file over a member it cannot find ("Cannot
    add panel to rigid group"); 0.11+ ignores both."""
    rigid = {k[len("rigid_group_"):] for k in top
             if k.startswith("rigid_group") and not k.startswith("rigid_group_collection")}
    for key, values in top.items():
        if not key.startswith("rigid_group"):
            continue
        collection = key.startswith("rigid_group_collection")
        known = rigid if collection else set(panels)
        for value in values:
            for member in (m.strip() for m in value.split(",")):
                if member and member not in known:
                    problems.append(f"{key}: {'rigid group' if collection else 'panel'} "
                                    f"{member!r} not found (0.10 refuses the file)")


def _check_group(name: str, value: str, panels: dict[str, dict[str, str]], groups: set[str],
                 problems: list[str]) -> None:
    """0.11+ resolves a group's members as it reads the line (``Unknown panel group``)."""
    members = [m.strip() for m in value.split(",")]
    if name in groups or name in panels:
        problems.append(f"group_{name}: duplicate panel group {name!r}")
    if not any(members):
        problems.append(f"group_{name} has no members")
    for i, member in enumerate(members):
        if member in members[:i]:
            problems.append(f"group_{name}: duplicate member {member!r}")
        elif member not in panels and member not in groups:
            problems.append(f"group_{name}: unknown panel group {member!r} (groups must come "
                            f"after their members)")
    groups.add(name)


def _check_panel(name: str, f: dict[str, str], problems: list[str]) -> None:
    where = f"panel {name}"
    for key in ("min_fs", "max_fs", "min_ss", "max_ss"):
        value = _number(f.get(key, "-1"))
        if value is None or value < 0:
            problems.append(f"{where}: no {key}")
    for key in ("corner_x", "corner_y", "res"):
        value = _number(f.get(key, "nan"))
        if value is None or not np.isfinite(value):
            problems.append(f"{where}: no {key}")
    for key in ("fs", "ss"):
        if key not in f or not _DIRECTION.match("".join(f[key].split())):
            problems.append(f"{where}: no valid {key} direction")
    if "adu_per_eV" not in f and "adu_per_photon" not in f:
        problems.append(f"{where}: needs adu_per_eV or adu_per_photon")
    dims = {int(k[3:]): v for k, v in f.items() if k.startswith("dim") and k[3:].isdigit()}
    order = [dims[n] for n in sorted(dims)] if dims else ["ss", "fs"]
    if "fs" not in order or "ss" not in order:
        problems.append(f"{where}: dimensions {order} lack fs or ss")
    elif order.index("ss") >= order.index("fs"):
        problems.append(f"{where}: fast scan dimension must be higher than slow scan")
    if "max_adu" in f:
        problems.append(f"{WARNING}{where}: max_adu set (CrystFEL advises against it)")
    if "badrow_direction" in f:
        problems.append(f"{WARNING}{where}: badrow_direction is ignored by 0.10+")
    data_pl = f.get("data", "/data/data").count("%")
    for n in range(8):
        data, file = f.get(f"mask{n}_data"), f.get(f"mask{n}_file")
        if file is not None and data is None:
            problems.append(f"{where}: mask{n} has a file but no data location")
        if data is not None and not data.startswith("/"):
            problems.append(f"{where}: invalid mask location {data!r}")
        if data is None and file is None and any(
                _bits(f.get(f"mask{n}_{b}", "0")) for b in ("goodbits", "badbits")):
            problems.append(f"{where}: mask{n} good/bad bits without a mask location")
        if data is not None and data.count("%") > data_pl:
            problems.append(f"{where}: mask{n} has more placeholders than the data path")
    if f.get("saturation_map", "").count("%") > data_pl:
        problems.append(f"{where}: saturation map has more placeholders than the data path")


def _check_bad_regions(bad: dict[str, dict[str, str]], panels: dict[str, dict[str, str]],
                       problems: list[str]) -> None:
    for name, f in bad.items():
        fsss = [k for k in ("min_fs", "max_fs", "min_ss", "max_ss") if k in f]
        xy = [k for k in ("min_x", "max_x", "min_y", "max_y") if k in f]
        if fsss and xy:
            problems.append(f"bad region {name} mixes x/y and fs/ss")
            continue
        if not fsss and not xy:
            problems.append(f"bad region {name} has no coordinate ranges")
            continue
        if not fsss:
            continue
        panel = f.get("panel")
        if panel is None:
            if len(panels) != 1:
                problems.append(f"bad region {name}: panel not specified")
            continue
        if panel not in panels:
            problems.append(f"bad region {name}: no such panel {panel!r}")
            continue
        p = {k: _number(panels[panel].get(k, "-1")) or 0.0
             for k in ("min_fs", "max_fs", "min_ss", "max_ss")}
        b = {k: _number(f.get(k, "0")) or 0.0 for k in ("min_fs", "max_fs", "min_ss", "max_ss")}
        if (b["min_fs"] < p["min_fs"] or b["min_ss"] < p["min_ss"] or b["max_fs"] > p["max_fs"]
                or b["max_ss"] > p["max_ss"]):
            problems.append(f"bad region {name} is outside the bounds of panel {panel}")


def _path_part(value: str) -> str | None:
    head = value.split()[0] if value.split() else ""
    return head if head.startswith("/") and "%" not in head else None


def _check_h5(path: str, top: dict[str, list[str]], panels: dict[str, dict[str, str]],
              problems: list[str]) -> None:
    """Every dataset the geometry names must be in ``path`` (or the mask file it names)."""
    import h5py

    where = os.path.basename(path)
    with h5py.File(path, "r") as h5:
        n_frames = None
        for name, f in panels.items():
            data = _path_part(f.get("data", "/data/data"))
            if data is None:
                continue
            ds = h5.get(data)
            if not isinstance(ds, h5py.Dataset):
                problems.append(f"{where}: no dataset {data} (data of panel {name})")
                continue
            dims = [f[k] for k in sorted((k for k in f if k.startswith("dim") and k[3:].isdigit()),
                                         key=lambda k: int(k[3:]))] or ["ss", "fs"]
            if ds.ndim != len(dims):
                problems.append(f"{where}: {data} has {ds.ndim} dimensions, the geometry "
                                f"{len(dims)}")
                continue
            if "%" in dims:
                n_frames = int(ds.shape[dims.index("%")])
            for axis, key in (("ss", "max_ss"), ("fs", "max_fs")):
                if axis in dims and ds.shape[dims.index(axis)] <= (_number(f.get(key, "0")) or 0):
                    problems.append(f"{where}: {data} is too small for panel {name}")
            for n in range(8):
                mask = f.get(f"mask{n}_data")
                if mask is None or "%" in mask:
                    continue
                file = f.get(f"mask{n}_file")
                if file is not None:
                    if not os.path.exists(file):
                        problems.append(f"{where}: mask file {file} not found")
                        continue
                    with h5py.File(file, "r") as other:
                        found = isinstance(other.get(mask), h5py.Dataset)
                else:
                    found = isinstance(h5.get(mask), h5py.Dataset)
                if not found:
                    problems.append(f"{where}: no mask dataset {mask} (panel {name})")
            sat = f.get("saturation_map")
            if sat and "saturation_map_file" not in f and not isinstance(h5.get(sat),
                                                                          h5py.Dataset):
                problems.append(f"{where}: no saturation map {sat}")
        for key in ("photon_energy", "wavelength", "electron_voltage", "clen",
                    "detector_shift_x", "detector_shift_y"):
            for value in top.get(key, []):
                header = _path_part(value)
                if header is None:
                    continue
                ds = h5.get(header)
                if not isinstance(ds, h5py.Dataset):
                    problems.append(f"{where}: no dataset {header} ({key})")
                elif ds.size not in (1, n_frames if n_frames is not None else 1):
                    problems.append(f"{where}: {header} holds {ds.size} values for "
                                    f"{n_frames} frames ({key})")
        for value in top.get("peak_list", []):
            group = _path_part(value)
            kind = (top.get("peak_list_type") or ["auto"])[-1]
            if group is None:
                continue
            if kind == "cxi" or (kind == "auto" and path.endswith(".cxi")):
                for column in ("nPeaks", "peakXPosRaw", "peakYPosRaw", "peakTotalIntensity"):
                    if not isinstance(h5.get(f"{group}/{column}"), h5py.Dataset):
                        problems.append(f"{where}: no {group}/{column} (peak_list)")
            elif not isinstance(h5.get(group), h5py.Dataset):
                problems.append(f"{where}: no peak list {group}")


def errors_only(problems: Sequence[str]) -> list[str]:
    """The problems that make CrystFEL refuse the file (warnings dropped)."""
    return [p for p in problems if not p.startswith(WARNING)]


__all__: Any = ["crystfel_problems", "errors_only", "WARNING"]
