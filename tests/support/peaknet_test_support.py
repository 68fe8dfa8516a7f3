"""Test and benchmark devices, importable as ``peaknet_test_support`` (tests/conftest.py puts this
folder on ``sys.path`` and on ``PYTHONPATH``, so Ray worker processes started by a test import it
too).  Nothing here ships in the package.

:class:`LocalMaxFinder` is a plain threshold + local-maximum finder: tests of the *pipeline
mechanics* (queues, leases, faults, resumption) run it in seconds on CPU, where model quality is
irrelevant.  It writes real peak tables, so what the writers store is checked end to end.  Pass the
class itself as the pipeline's ``frame_finder`` (a factory), as any host would pass its own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.types import Frame, FrameResult, peaks_from_columns


class LocalMaxFinder:
    """Pixels above ``threshold`` that are the maximum of their 3x3 neighbourhood are peaks.

    ``delay_s`` adds a fixed cost per frame, standing in for a model's compute time in tests that
    need a batch to be in flight long enough to kill the worker holding it.  ``hold_from`` /
    ``hold_file``: frames from that serial on wait (up to ``hold_timeout_s``) until the file
    exists, so a test can interrupt a run that cannot have finished, however busy the machine.
    """

    def __init__(self, threshold: float = 50.0, delay_s: float = 0.0,
                 hold_from: int | None = None, hold_file: str | None = None,
                 hold_timeout_s: float = 120.0) -> None:
        self.threshold = float(threshold)
        self.delay_s = float(delay_s)
        self.hold_from, self.hold_file = hold_from, hold_file
        self.hold_timeout_s = float(hold_timeout_s)

    def _hold(self, frame: Frame) -> None:
        if self.hold_from is None or self.hold_file is None or frame.serial < self.hold_from:
            return
        deadline = time.monotonic() + self.hold_timeout_s
        while not os.path.exists(self.hold_file) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _panel_peaks(self, index: int, panel: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        from scipy.ndimage import maximum_filter

        data = np.where(mask, panel, 0.0) if mask is not None else panel
        is_max = (data >= self.threshold) & (data == maximum_filter(data, size=3))
        ss, fs = np.nonzero(is_max)
        values = data[ss, fs].astype(np.float64)
        return peaks_from_columns(panel=np.full(len(ss), index, dtype=np.int32),
                                  fs=fs.astype(np.float64), ss=ss.astype(np.float64),
                                  intensity=values, max_value=values,
                                  npix=np.ones(len(ss), dtype=np.int32))

    def find_frames(self, frames: Iterable[Frame]) -> Iterator[FrameResult]:
        for frame in frames:
            self._hold(frame)
            if self.delay_s:
                time.sleep(self.delay_s)
            masks = frame.masks or [None] * len(frame.panels)
            tables = [self._panel_peaks(i, p, m)
                      for i, (p, m) in enumerate(zip(frame.panels, masks, strict=True))]
            peaks = np.concatenate(tables) if tables else peaks_from_columns()
            yield FrameResult(frame=frame, peaks=peaks, hit=len(peaks) > 0)


def spot_panel(n_spots: int, shape: tuple[int, int] = (96, 96), seed: int = 0) -> np.ndarray:
    """A panel of noise (10 +- 1) with ``n_spots`` 3x3 spots (peak 400) on a 9-px grid, at places
    that change with ``seed``: hit-calling tests count peaks that no run-level defect filter would
    take for recurring pixels."""
    rng = np.random.default_rng(seed)
    panel = rng.normal(10.0, 1.0, shape).astype(np.float32)
    rows, cols = (shape[0] - 6) // 9, (shape[1] - 6) // 9
    if n_spots > rows * cols:
        raise ValueError(f"{n_spots} spots do not fit a {shape} panel")
    for cell in rng.permutation(rows * cols)[:n_spots]:
        y, x = 4 + 9 * (cell // cols) + int(rng.integers(3)), 4 + 9 * (cell % cols) + int(
            rng.integers(3))
        panel[y - 1:y + 2, x - 1:x + 2] += np.array([[100, 200, 100], [200, 400, 200],
                                                     [100, 200, 100]], np.float32)
    return panel


class BrightPredictor:
    """Stand-in segmenter: probability 1 on pixels above ``level`` (spots of :func:`spot_panel`),
    picklable for worker processes."""

    def __init__(self, level: float = 100.0) -> None:
        self.level = level

    def __call__(self, panels, masks):
        return [(np.asarray(p) > self.level).astype(np.float32) for p in panels]


def spotted_images(seed: int, count: int, shape: tuple[int, int] = (96, 128)) -> tuple[Any, Any]:
    """``count`` Poisson(3) images ``(count, 1, *shape)`` with four bright 3 x 3 spots each, as
    torch tensors, and an all-good mask: the model-layer tests' input."""
    import torch

    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, (count, 1, *shape)).astype(np.float32)
    for k in range(count):
        for _ in range(4):
            y, z = rng.integers(4, shape[0] - 4), rng.integers(4, shape[1] - 4)
            x[k, 0, y - 1:y + 2, z - 1:z + 2] += rng.uniform(50, 500)
    return torch.from_numpy(x), torch.ones(x.shape, dtype=torch.bool)


#: a two-level PeakNet with local input normalisation: a receptive field of ~150 px, so that
#: "far" fits in a small test image (the model-layer tests add their ``image_stats``)
SMALL_PEAKNET: dict[str, Any] = {"dims": [8, 16], "depths": [1, 1], "neck_width": 16,
                                 "neck_blocks": 1, "head_channels": 8, "input_norm": "local"}


def perturbed_norms(model: Any, seed: int) -> Any:
    """``model`` in eval mode with its GRN, norm and head parameters moved away from their
    identity init (plus 0.5 x a standard normal, seeded), so that what the norms compute
    matters: the model-layer tests' network."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "grn" in name or "norm" in name or "head" in name:
                param.add_(0.5 * torch.randn_like(param))
    return model.eval()


def load_script(path: str | os.PathLike[str], name: str | None = None) -> Any:
    """A script that is not a package module (``examples/*.py``, ``benchmarks/*.py``, shared
    test helpers), loaded by path as module ``name`` (default: the file's stem) and registered in
    ``sys.modules``, where dataclasses look their module up while a class is built."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(path)
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_cbf(path: Path, distance_mm: float, size: int = 48,
             pixels: np.ndarray | None = None) -> Path:
    """A one-panel miniCBF dxtbx reads, its detector ``distance_mm`` from the sample, 1 A beam;
    Poisson(5) counts unless ``pixels`` (``size`` x ``size`` integers) are given."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import BeamFactory, DetectorFactory
    from scitbx.array_family import flex

    detector = DetectorFactory.simple("PAD", distance_mm, (size * 0.086, size * 0.086), "+x",
                                      "-y", (0.172, 0.172), (size, size), (0, 1e6))
    if pixels is None:
        pixels = np.random.default_rng(int(distance_mm)).poisson(5, (size, size))
    FormatCBFMini.as_file(detector, BeamFactory.simple(1.0), None, None,
                          flex.int(np.asarray(pixels, np.int32)), str(path))
    return path


def tiny_nxmx(folder: Path, stack: np.ndarray, *, still: bool = True,
              pixel_mask: np.ndarray | None = None, name: str = "tiny") -> Path:
    """An NXmx master file (``NAME_master.h5``) and its linked data file, as an Eiger writes
    them, holding ``stack`` (images x rows x columns, stored in its own dtype): still shots
    (no goniometer) with ``still``, else a 0.1-degree rotation; 75 um pixels, 100 mm, 1 A,
    the beam at the centre; ``pixel_mask`` (NeXus: 0 good) if given.  dxtbx reads it with
    its NXmx format."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = stack.shape
    data_name = f"{name}_data_000001.h5"
    with h5py.File(folder / data_name, "w") as h5:
        h5["/entry/data/data"] = stack
        h5["/entry"].attrs["NX_class"] = "NXentry"
        h5["/entry/data"].attrs["NX_class"] = "NXdata"
        h5["/entry/data/data"].attrs.update(image_nr_low=1, image_nr_high=n)
    master = folder / f"{name}_master.h5"
    with h5py.File(master, "w") as h5:
        entry = h5.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry["definition"] = "NXmx"
        entry["start_time"] = "2026-12-07T00:00:00Z"
        entry.create_group("data").attrs["NX_class"] = "NXdata"
        entry["data/data_000001"] = h5py.ExternalLink(data_name, "/entry/data/data")
        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        beam = instrument.create_group("beam")
        beam.attrs["NX_class"] = "NXbeam"
        beam["incident_wavelength"] = 1.0
        beam["incident_wavelength"].attrs["units"] = "angstrom"
        det = instrument.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        det["description"] = "EIGER"
        det["sensor_material"] = "Si"
        det["sensor_thickness"] = 0.45
        det["sensor_thickness"].attrs["units"] = "mm"
        det["depends_on"] = "/entry/instrument/detector/transformations/translation"
        for key, value, unit in (("count_time", 0.01, "s"), ("frame_time", 0.01, "s"),
                                 ("distance", 0.1, "m"), ("x_pixel_size", 75e-6, "m"),
                                 ("y_pixel_size", 75e-6, "m"),
                                 ("beam_center_x", cols / 2, "pixel"),
                                 ("beam_center_y", rows / 2, "pixel")):
            det[key] = value
            det[key].attrs["units"] = unit
        if pixel_mask is not None:
            det["pixel_mask"] = np.asarray(pixel_mask, np.uint32)
            det["pixel_mask_applied"] = False
        transformations = det.create_group("transformations")
        transformations.attrs["NX_class"] = "NXtransformations"
        translation = transformations.create_dataset("translation", data=[100.0])
        translation.attrs.update(transformation_type="translation", vector=[0.0, 0.0, 1.0],
                                 units="mm", depends_on=".")
        module = det.create_group("module")
        module.attrs["NX_class"] = "NXdetector_module"
        module["data_origin"] = np.array([0, 0], np.int64)
        module["data_size"] = np.array([rows, cols], np.int64)
        offset = module.create_dataset("module_offset", data=[0.0])
        offset.attrs.update(transformation_type="translation", vector=[1.0, 0.0, 0.0],
                            offset=[cols / 2 * 0.075, rows / 2 * 0.075, 0.0], units="mm",
                            depends_on=translation.name)
        for axis, vector in (("fast", [-1.0, 0.0, 0.0]), ("slow", [0.0, -1.0, 0.0])):
            step = module.create_dataset(f"{axis}_pixel_direction", data=[0.075])
            step.attrs.update(transformation_type="translation", vector=vector,
                              offset=[0.0, 0.0, 0.0], units="mm", depends_on=offset.name)
        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        if still:
            sample["depends_on"] = "."
        else:
            sample["depends_on"] = "/entry/sample/transformations/omega"
            axes = sample.create_group("transformations")
            axes.attrs["NX_class"] = "NXtransformations"
            omega = axes.create_dataset("omega", data=np.arange(n) * 0.1)
            omega.attrs.update(transformation_type="rotation", vector=[-1.0, 0.0, 0.0],
                               units="deg", depends_on=".")
            axes["omega_increment_set"] = 0.1
    return master


def tiny_smv(path: Path, pixels: np.ndarray, *, gain: float | None = 2.4,
             pedestal: int = 40) -> Path:
    """An ADSC SMV image dxtbx reads (``FormatSMVADSC``): ``pixels`` (rows x columns, stored as
    little-endian unsigned 16-bit) behind a 512-byte header declaring ``GAIN`` (ADU per
    photon; None: no GAIN key, dxtbx then guesses from the model) and ``IMAGE_PEDESTAL``;
    0.1 mm pixels, 100 mm, 1 A, the beam at the centre, a 1-degree rotation."""
    rows, cols = pixels.shape
    header: dict[str, object] = {
        "HEADER_BYTES": 512, "DIM": 2, "BYTE_ORDER": "little_endian",
        "TYPE": "unsigned_short", "SIZE1": cols, "SIZE2": rows, "PIXEL_SIZE": 0.1,
        "BIN": "none", "ADC": "slow", "DETECTOR_SN": 999, "BEAMLINE": "TEST",
        "DATE": "Tue Jun 10 12:00:00 2008", "TIME": 1.0, "DISTANCE": 100.0,
        "OSC_RANGE": 1.0, "PHI": 0.0, "OSC_START": 0.0, "TWOTHETA": 0.0, "AXIS": "phi",
        "WAVELENGTH": 1.0, "BEAM_CENTER_X": rows / 2 * 0.1, "BEAM_CENTER_Y": cols / 2 * 0.1,
        "IMAGE_PEDESTAL": pedestal,
    }
    if gain is not None:
        header["GAIN"] = gain
    text = "{\n" + "".join(f"{key}={value};\n" for key, value in header.items()) + "}\n"
    path.write_bytes(text.encode().ljust(512, b" ") + np.asarray(pixels, "<u2").tobytes())
    return path


#: The dataset of a toy HDF5 layout that only test plugins read: no image where the CXI reader
#: looks, so the built-ins fail on it and the plugin sources' sniff must be asked.
PACKED_DATASET = "packed/blob"


def write_packed(path: Path) -> Path:
    """An HDF5 file of the toy layout (:data:`PACKED_DATASET`)."""
    import h5py

    with h5py.File(path, "w") as h5:
        h5[PACKED_DATASET] = np.zeros(10, np.float32)
    return path


def is_packed(path: str) -> bool:
    """A test plugin's ``sniff`` of the toy layout: cheap, and never raises."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return PACKED_DATASET in h5
    except Exception:  # noqa: BLE001  (sniff: anything unreadable is not ours)
        return False


#: The DIALS distribution's top-level packages (what :func:`hide_dials` hides).
DIALS_PACKAGES = ("dials", "dxtbx", "cctbx", "scitbx", "libtbx", "iotbx", "boost_adaptbx")


class _DialsHider:
    """A ``sys.meta_path`` finder standing between this process and the DIALS distribution's
    packages (:func:`hide_dials`)."""

    def __init__(self, broken: Exception | None) -> None:
        self.broken = broken

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        top = name.partition(".")[0]
        if top not in DIALS_PACKAGES:
            return None
        if self.broken is None:  # as the import system says it where nothing is found
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        import importlib.machinery

        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        assert self.broken is not None
        raise self.broken


def hide_dials(monkeypatch: Any, broken: Exception | None = None) -> None:
    """Make the DIALS distribution (dials, dxtbx, cctbx, scitbx, libtbx...) unimportable in
    this process until the test ends, as in a Python installed with pip alone: the modules of
    it already imported are hidden, and importing one raises ``No module named 'dxtbx'``.
    With ``broken``, its packages are found but importing one raises ``broken``, as a DIALS
    that is installed but fails to load (Debian's without LIBTBX_BUILD: a FileNotFoundError).
    Nothing is uninstalled: CI, which has DIALS, runs these tests too."""
    import sys

    for name in list(sys.modules):
        if name.partition(".")[0] in DIALS_PACKAGES:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_DialsHider(broken), *sys.meta_path])


#: How a compiled extension that does not load fails its import (a library built against
#: another Boost, say): what :func:`break_dials` makes one of DIALS' extensions raise.
BROKEN_EXTENSION = ("/usr/lib/python3/dist-packages/{0}.so: undefined symbol: "
                    "_ZN5boost6python7objects")


def break_dials(monkeypatch: Any, folder: Any, extension: str = "dials_array_family_flex_ext",
                crash: bool = False) -> str:
    """Make DIALS installed but failing to load, for this process's child processes and for
    imports of the DIALS modules it has not imported yet, without touching the real one: a
    module named as one of DIALS' compiled extensions (``dials_array_family_flex_ext``, which
    ``dials.array_family.flex`` loads; ``dxtbx_model_ext``, which ``dxtbx.model`` loads) is put
    in ``folder``, first on ``sys.path``, until the test ends.  Its import raises the
    ImportError of an extension that does not load, or with ``crash`` kills its process with
    SIGSEGV, as a broken extension can.  Unlike :func:`hide_dials`, it reaches the child that
    ``require_dials(load=False)`` imports DIALS in (it inherits ``sys.path``).  DIALS' and
    dxtbx's modules that this process loaded (an earlier test's) are taken out of
    ``sys.modules`` until the test ends, with the extension: the check asks no child where the
    modules are loaded already (they loaded, so DIALS works there), and a fresh process that
    met this broken DIALS would not have them.  Returns the ImportError's message."""
    import sys

    for name in [m for m in sys.modules
                 if m.split(".")[0] in ("dials", "dxtbx") or m == extension]:
        monkeypatch.delitem(sys.modules, name)
    said = BROKEN_EXTENSION.format(extension)
    body = ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n" if crash
            else f"raise ImportError({said!r})\n")
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{extension}.py").write_text(body)
    monkeypatch.syspath_prepend(str(folder))
    return said


#: A third-party plugin module (for the ``install_plugin`` fixture of tests/conftest.py) with
#: the model family ``tinyfam`` and its one size ``my-tiny``: two convolutions, keeping the
#: image's size, as the hookspec ``peaknet_model_families`` asks.  Tests break the contract by
#: replacing a line of it.
TINY_FAMILY = """
    import torch
    from peaknet_xtal.hookspecs import hookimpl
    from peaknet_xtal.model.zoo import ModelFamily

    class TinyNet(torch.nn.Module):
        \"\"\"Two convolutions.\"\"\"

        def __init__(self, width=4, name="custom"):
            super().__init__()
            self.config = {"family": "tinyfam", "name": name, "width": width}
            self.net = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1),
                                           torch.nn.ReLU(), torch.nn.Conv2d(width, 2, 1))

        def forward(self, x, mask=None):
            return self.net(x)

    @hookimpl
    def peaknet_model_families():
        return [ModelFamily("tinyfam", "two convolutions", TinyNet, {"my-tiny": {"width": 3}})]
"""


def halving_family(kernel: int, pad_multiple: int | None = None) -> str:
    """A plugin module (as :data:`TINY_FAMILY`) whose family ``halving`` (size ``my-halving``)
    halves the image with a strided convolution of ``kernel`` (2: an odd side loses a pixel;
    3, padded: it gains one) and doubles it back, declaring ``pad_multiple`` if given."""
    declared = "" if pad_multiple is None else f"pad_multiple = {pad_multiple}"
    return f"""
    import torch
    from peaknet_xtal.hookspecs import hookimpl
    from peaknet_xtal.model.zoo import ModelFamily

    class Halving(torch.nn.Module):
        {declared}

        def __init__(self, name=None):
            super().__init__()
            self.config = {{"family": "halving", "name": name}}
            self.down = torch.nn.Conv2d(1, 4, {kernel}, stride=2, padding={kernel - 2})
            self.up = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)

        def forward(self, x, mask=None):
            return self.up(torch.relu(self.down(x)))

    @hookimpl
    def peaknet_model_families():
        return [ModelFamily("halving", "down and up", Halving, {{"my-halving": {{}}}})]
"""


def unchecked_weights(family: str, name: str, folder: Path) -> Path:
    """``folder/model.safetensors`` (and its ``.json``): weights of the model ``name`` of the
    installed plugin family ``family``, built by its ``build`` and saved without the zoo's
    contract check, as a plugin author's own training script leaves them; so a model breaking
    the contract (``halving_family(2)``) reaches a host as a weights file."""
    from peaknet_xtal.model import save_model
    from peaknet_xtal.registry import model_families

    return save_model(model_families()[family].build(name=name), folder)


def signalled_when(command: list[str], ready: Callable[[], bool], signum: int, *,
                   group: bool = False, wait_s: float = 120.0,
                   env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run ``command`` as a real process, send it ``signum`` once ``ready()`` (a checkpoint or
    an output file exists; at the latest after ``wait_s``), and return its exit status and
    stderr.  ``group``: the process in a group of its own, and the signal sent to the whole
    group, as ``timeout``, Slurm and a terminal send it (its child processes get it too); else
    to the process alone.  The signal's default action is set in the child, whatever the test
    run's is."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=None if env is None else dict(env), start_new_session=group,
        preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + wait_s
        while not ready() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        if process.poll() is None:  # one that ended early is the test's to judge
            if group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
        _, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
    return process.returncode, err
