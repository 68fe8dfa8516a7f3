"""A corpus of malformed and extreme inputs, built by code from one small simulated run.

Every case is a file a careless or hostile user could hand to a command, with what must happen:
``error`` (non-zero exit, one line naming the file and saying what is wrong, no traceback) or
``warn`` (exit 0, a warning naming the file, results as on the clean data).  Imported (as
``peaknet_bad_inputs``, from ``tests/support``) by ``tests/cli/test_bad_inputs.py``,
``tests/plugins/test_dials_bad_inputs.py`` and the measuring script
``tests/cli/bad_input_table.py``.
"""
from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

DATA = "/entry_1/data_1/data"
MASK = "/entry_1/data_1/mask"
N_FRAMES = 3


@dataclass
class Case:
    """One bad input: ``path`` is what the command is given (with ``geometry`` for images)."""

    name: str
    kind: str  # image | geometry | model | stream
    path: Path
    expect: str  # error | warn
    says: str = ""  # a word the error or warning must contain (case-insensitive)
    geometry: Path | None = None
    commands: tuple[str, ...] = field(default=())


@dataclass
class Base:
    """The clean run the corpus is derived from."""

    dir: Path
    cxi: Path
    geom: Path
    stream: Path
    n_frames: int


def make_base(root: Path, geometry_text: Callable[..., str]) -> Base:
    """Three simulated frames on two 256x128 panels (a second or two), plus a stream of their
    true peaks with the geometry embedded, in ``root/clean``."""
    from peaknet_xtal.formats.geometry import parse_geometry, read_geometry
    from peaknet_xtal.formats.stream import Chunk, write_stream
    from peaknet_xtal.sim.run import simulate_run

    text = geometry_text(["top", "bottom"], 256, 128, [(-128.0, -128.0), (-128.0, 0.0)],
                         photon_energy="9500 eV", clen="0.070 m", res="13333.3",
                         adu_per_photon="1")
    paths = simulate_run(parse_geometry(text), N_FRAMES, 11, root / "sim", stream=False,
                         progress=False)
    clean = root / "clean"
    clean.mkdir(parents=True, exist_ok=True)
    cxi, geom = clean / "data.cxi", clean / "data.geom"
    shutil.copy(paths.cxi, cxi)
    shutil.copy(paths.geom, geom)
    with h5py.File(cxi, "a") as h5:
        h5.attrs["peaknet_geometry"] = "data.geom"
    stream = clean / "run.stream"
    chunks = [Chunk(filename=str(cxi), event=f"//{i}", serial=i + 1) for i in range(N_FRAMES)]
    write_stream(stream, chunks, geometry_text=read_geometry(geom).to_text())
    return Base(clean, cxi, geom, stream, N_FRAMES)


# ------------------------------------------------------------------------------- images

def _image_case(base: Base, root: Path, name: str, edit: Callable[[h5py.File], None]) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    cxi = folder / "data.cxi"
    shutil.copy(base.cxi, cxi)
    shutil.copy(base.geom, folder / "data.geom")
    with h5py.File(cxi, "a") as h5:
        edit(h5)
    return cxi


def _replace_data(h5: h5py.File, data: np.ndarray, **kwargs: object) -> None:
    del h5[DATA]
    h5.create_dataset(DATA, data=data, **kwargs)


def _pixels(h5: h5py.File) -> np.ndarray:
    return np.asarray(h5[DATA][()], dtype=np.float32)


def _with_values(value: float, count: int) -> Callable[[h5py.File], None]:
    """``count`` pixels per frame (spread over the slab, away from the edges) set to ``value``."""
    def edit(h5: h5py.File) -> None:
        data = _pixels(h5)
        rng = np.random.default_rng(5)
        for frame in data:
            ys = rng.integers(8, frame.shape[0] - 8, count)
            xs = rng.integers(8, frame.shape[1] - 8, count)
            frame[ys, xs] = value
        _replace_data(h5, data)
    return edit


def _rows_at_float_max(h5: h5py.File) -> None:
    data = _pixels(h5)
    data[:, 40, :] = np.finfo(np.float32).max
    data[:, 170, :] = np.finfo(np.float32).max
    _replace_data(h5, data)


def _uint16_gaps(h5: h5py.File) -> None:
    """Whole counts in uint16, with a row and a column of every frame at 65535: the largest
    value of the type, which Eiger file writers put in module gaps."""
    data = np.clip(np.round(_pixels(h5)), 0, 65534).astype(np.uint16)
    data[:, 60, :] = 65535
    data[:, :, 100] = 65535
    _replace_data(h5, data)


def _int32_gaps(h5: h5py.File) -> None:
    """Whole counts in int32, with a row of every frame at -1 and a pixel at -2: how Pilatus
    and Eiger writers mark gaps and defective pixels in signed data."""
    data = np.clip(np.round(_pixels(h5)), 0, None).astype(np.int32)
    data[:, 60, :] = -1
    data[:, 70, 30] = -2
    _replace_data(h5, data)


def _first_frame_nan(h5: h5py.File) -> None:
    data = _pixels(h5)
    data[0] = np.nan
    _replace_data(h5, data)


def _middle_frame_zero(h5: h5py.File) -> None:
    """A failed read-out between good frames: every pixel of frame 1 at 0."""
    data = _pixels(h5)
    data[1] = 0.0
    _replace_data(h5, data)


def _panel_zero(h5: h5py.File) -> None:
    """A module whose data were dropped: the "bottom" panel (slab rows 128-255) at 0 in every
    frame."""
    data = _pixels(h5)
    data[:, 128:, :] = 0.0
    _replace_data(h5, data)


def _offset(h5: h5py.File) -> None:
    _replace_data(h5, _pixels(h5) - 1000.0)


def _boolean(h5: h5py.File) -> None:
    _replace_data(h5, _pixels(h5) > 1)


def _strings(h5: h5py.File) -> None:
    shape = h5[DATA].shape
    del h5[DATA]
    h5.create_dataset(DATA, data=np.full(shape, b"x", dtype="S1"))


def _zero_frames(h5: h5py.File) -> None:
    shape = h5[DATA].shape
    _replace_data(h5, np.zeros((0, *shape[1:]), np.float32))


def _small(h5: h5py.File) -> None:
    _replace_data(h5, _pixels(h5)[:, :100, :100])


def _mask(shape: tuple[int, ...]) -> Callable[[h5py.File], None]:
    def edit(h5: h5py.File) -> None:
        if MASK in h5:
            del h5[MASK]
        h5.create_dataset(MASK, data=np.ones(shape, np.uint16))
    return edit


def _vds_missing(folder: Path) -> Callable[[h5py.File], None]:
    """The stack becomes a virtual dataset over a source file that is then deleted."""
    def edit(h5: h5py.File) -> None:
        data = _pixels(h5)
        source = folder / "source.h5"
        with h5py.File(source, "w") as src:
            src.create_dataset("data", data=data)
        layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
        layout[...] = h5py.VirtualSource("source.h5", "data", shape=data.shape)
        del h5[DATA]
        h5.create_virtual_dataset(DATA, layout, fillvalue=0)
    return edit


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def image_cases(base: Base, root: Path) -> list[Case]:
    root = root / "images"
    shape = h5py.File(base.cxi, "r")[DATA].shape
    specs: list[tuple[str, Callable[[h5py.File], None], str, str]] = [
        ("nan_pixels", _with_values(np.nan, 5), "warn", "non-finite"),
        ("inf_pixels", _with_values(np.inf, 5), "warn", "non-finite"),
        ("pixels_3e38", _with_values(3e38, 5), "warn", "absurd"),
        ("rows_float_max", _rows_at_float_max, "warn", "absurd"),
        ("frame_all_nan", _first_frame_nan, "warn", "no usable pixel"),
        ("frame_all_zero", _middle_frame_zero, "warn", "every pixel holds the same value"),
        ("panel_all_zero", _panel_zero, "warn", "(in bottom) holds one value (0): no data"),
        ("uint16_gaps", _uint16_gaps, "warn", "detector writers put in gaps"),
        ("int32_gaps", _int32_gaps, "warn", "detector writers put in gaps"),
        ("offset_minus_1000", _offset, "warn", "offset"),
        ("boolean_image", _boolean, "error", "boolean"),
        ("string_dtype", _strings, "error", "numbers"),
        ("zero_frames", _zero_frames, "error", "frame"),
        ("data_smaller_than_geometry", _small, "error", "geometry"),
        ("mask_2d_wrong_shape", _mask((shape[1] - 1, shape[2])), "error", "mask shape"),
        ("mask_3d_wrong_count", _mask((shape[0] + 2, shape[1], shape[2])), "error",
         "mask shape"),
    ]
    cases = []
    for name, edit, expect, says in specs:
        cxi = _image_case(base, root, name, edit)
        cases.append(Case(name, "image", cxi, expect, says, geometry=cxi.with_suffix(".geom")))
    cxi = _image_case(base, root, "vds_missing_source", _vds_missing(root / "vds_missing_source"))
    (cxi.parent / "source.h5").unlink()
    cases.append(Case("vds_missing_source", "image", cxi, "error", "source",
                      geometry=cxi.with_suffix(".geom")))
    cxi = _image_case(base, root, "truncated_hdf5", lambda h5: None)
    _truncate(cxi)
    cases.append(Case("truncated_hdf5", "image", cxi, "error", "data.cxi",
                      geometry=cxi.with_suffix(".geom")))
    folder = root / "random_bytes_cxi"
    folder.mkdir(parents=True, exist_ok=True)
    cxi = folder / "data.cxi"
    cxi.write_bytes(np.random.default_rng(1).bytes(4096))
    shutil.copy(base.geom, folder / "data.geom")
    cases.append(Case("random_bytes_cxi", "image", cxi, "error", "data.cxi",
                      geometry=folder / "data.geom"))
    return cases


# ----------------------------------------------------------------------------- geometries

def _geometry_edits(text: str) -> dict[str, tuple[str, str]]:
    """name -> (geometry text, word the error must contain)."""
    lines = text.splitlines()

    def sub(old: str, new: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    top_ss = next(x for x in lines if x.startswith("bottom/min_ss"))
    return {
        "empty": ("", "no panels"),
        "missing_min_fs": ("\n".join(x for x in lines if not x.startswith("top/min_fs")) + "\n",
                           "min_fs"),
        "number_18four": (sub("top/max_fs = 255", "top/max_fs = 18four"), "18four"),
        "unknown_panel_in_bad_region": (text + "badx/min_fs = 0\nbadx/max_fs = 3\nbadx/min_ss = 0"
                                        "\nbadx/max_ss = 3\nbadx/panel = nosuch\n", "nosuch"),
        "zero_vector": (sub("top/fs = +1.0x +0.0y +0.0z", "top/fs = 0x +0y"), "zero vector"),
        "nan_corner": (sub("top/corner_x = -128.0", "top/corner_x = nan"), "finite"),
        "bad_dims": (sub("dim2 = fs", "dim2 = xx"), "dim2"),
        "max_below_min": (sub("top/max_ss = 127", "top/max_ss = -5"), "max_fs"),
        "res_zero": (sub("res = 13333.3", "res = 0"), "res"),
        "bad_mask_bits": (sub("mask_good = 0x1", "mask_good = 0xZZ"), "mask_good"),
        "negative_photon_energy": (sub("photon_energy = 9500.0000", "photon_energy = -9537"),
                                   "photon_energy"),
        "negative_clen": (text.replace("clen = 0.07", "clen = -0.07"), "camera length"),
        "overlapping_panels": (sub(top_ss, "bottom/min_ss = 60"), "overlaps"),
    }


def geometry_cases(base: Base, root: Path) -> list[Case]:
    root = root / "geometries"
    text = base.geom.read_text()
    cases = []
    for name, (geom_text, says) in _geometry_edits(text).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(base.cxi, folder / "data.cxi")
        geom = folder / "data.geom"
        geom.write_text(geom_text)
        cases.append(Case(name, "geometry", geom, "error", says, geometry=geom))
    folder = root / "binary"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(base.cxi, folder / "data.cxi")
    (folder / "data.geom").write_bytes(b"\x00\xff\xfe" + np.random.default_rng(2).bytes(300))
    cases.append(Case("binary", "geometry", folder / "data.geom", "error", "text",
                      geometry=folder / "data.geom"))
    return cases


# ---------------------------------------------------------------------------------- models

class _Marker:
    """Unpickling this writes a marker file: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (self.marker, "code ran"))


def malicious_pickle(path: Path, marker: Path) -> Path:
    """A pickle that creates ``marker`` when loaded (with plain ``pickle.load``)."""
    path.write_bytes(pickle.dumps(_Marker(marker)))
    return path


def model_cases(root: Path) -> list[Case]:
    from peaknet_xtal.model.weights_io import WEIGHTS_DIR

    root = root / "models"
    root.mkdir(parents=True, exist_ok=True)
    shipped = (WEIGHTS_DIR / "default.safetensors").read_bytes()
    config = json.loads((WEIGHTS_DIR / "default.json").read_text())
    cases = []

    def case(name: str, data: bytes, says: str, config_text: str | None = None) -> None:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.safetensors"
        path.write_bytes(data)
        if config_text is not None:
            (folder / "model.json").write_text(config_text)
        cases.append(Case(name, "model", path, "error", says))

    case("random_bytes", np.random.default_rng(3).bytes(2048), "safetensors")
    case("truncated", shipped[: len(shipped) // 2], "safetensors")
    case("json_list", shipped, "JSON object", json.dumps([config]))
    case("unknown_family", shipped, "family", json.dumps({**config, "family": "nosuchnet"}))
    header = json.dumps({"__metadata__": {}}).encode()
    case("empty_safetensors", struct.pack("<Q", len(header)) + header, "config")
    folder = root / "pickle_renamed"
    folder.mkdir(parents=True, exist_ok=True)
    path = malicious_pickle(folder / "model.safetensors", folder / "MARKER")
    cases.append(Case("pickle_renamed", "model", path, "error", "safetensors"))
    return cases


# --------------------------------------------------------------------------------- streams

def stream_cases(base: Base, root: Path) -> list[Case]:
    root = root / "streams"
    root.mkdir(parents=True, exist_ok=True)
    text = base.stream.read_text()
    cases = []
    for name, old, new, says in [
        ("embedded_geometry_18four", "top/max_fs = 255", "top/max_fs = 18four", "18four"),
        ("embedded_geometry_overlap", "bottom/min_ss = 128", "bottom/min_ss = 60", "overlaps"),
    ]:
        assert old in text, old
        path = root / f"{name}.stream"
        path.write_text(text.replace(old, new, 1))
        cases.append(Case(name, "stream", path, "error", says))
    return cases


def build_corpus(root: Path, geometry_text: Callable[..., str]) -> tuple[Base, list[Case]]:
    base = make_base(root, geometry_text)
    cases = (image_cases(base, root) + geometry_cases(base, root) + model_cases(root)
             + stream_cases(base, root))
    return base, cases
