"""Integrating files: CXI peak tables, CrystFEL streams, DIALS stills ``.expt``/``.refl``.

Each function reads positions and images, integrates, and writes the same table back with new
columns, atomically (nothing half-written under a final name).  Reruns resume: a finished CXI or
DIALS output is skipped, a stream grows under a hidden partial name (:func:`partial_path`), kept
after a failure and continued after its last complete chunk, and is renamed when complete.  The
detector gain is resolved the same way on every path (:class:`RunGain`).

Units and columns:

- CXI (``/entry_1/result_1``, one row per frame, ``nPeaks`` valid entries): the input columns
  plus ``peakPhotonsVI``, ``peakPhotonsVISigma`` (photons, posterior mean and sd),
  ``peakPhotonsVILik``, ``peakPhotonsVILikSigma`` (photons, the likelihood-only profile fit that
  mergers should read, see below), ``peakBackgroundVI``,
  ``peakBackgroundVISigma`` (photons per pixel), ``peakProfileXPosRaw``/``peakProfileYPosRaw``
  (profile centroid, raw slab pixel centres like ``peakXPosRaw``), ``peakProfileSigmaX``/``Y``
  (pixels), ``peakPhotonsSum``/``peakPhotonsSumSigma`` (summation over the same box).
- Streams: each crystal's reflection list gets ``I`` and ``sigma(I)`` from the VI likelihood
  alone and ``background`` from its background, in the stream's detector units (photons x gain,
  as indexamajig writes them), so mergers read it unchanged.
- DIALS: ``intensity.vi.value``/``intensity.vi.variance`` (photons: the posterior mean and
  variance, the best estimate of one spot read on its own), ``intensity.vi_lik.value``/
  ``variance`` (photons: the likelihood alone, for mergers), ``background.vi.mean`` and the
  summation of the same boxes as ``intensity.vsum.value``/``variance``; DIALS' own columns are
  left as they were.

Which to merge: the posterior mean is shrunk towards the integrator's intensity prior, and a
merger (careless, partialator, dials.scale) multiplies the likelihoods of all observations of a
reflection and, in careless, puts its own Wilson prior on the result: posterior means would bring
the integrator's prior in once per observation.  The likelihood-only estimate
(``VIIntegrator.likelihood_photons``: profile fitting with the learned profile, may be negative
like any background-subtracted intensity) is the measurement a merger expects.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.atomic import atomic_path
from peaknet_xtal.errors import FormatError
from peaknet_xtal.integration.api import Integrator

log = logging.getLogger(__name__)

#: New CXI column -> INTEGRATION_DTYPE field.
CXI_COLUMNS = {
    "peakPhotonsVI": "photons", "peakPhotonsVISigma": "photons_sigma",
    "peakPhotonsVILik": "lik_photons", "peakPhotonsVILikSigma": "lik_sigma",
    "peakBackgroundVI": "background", "peakBackgroundVISigma": "background_sigma",
    "peakProfileXPosRaw": "profile_fs", "peakProfileYPosRaw": "profile_ss",
    "peakProfileSigmaX": "profile_sigma_fs", "peakProfileSigmaY": "profile_sigma_ss",
    "peakPhotonsSum": "sum_photons", "peakPhotonsSumSigma": "sum_sigma",
}
#: Each new CXI column's unit (its ``units`` attribute, as the finder's columns carry theirs).
CXI_UNITS = {
    **{name: "photons" for name in ("peakPhotonsVI", "peakPhotonsVISigma", "peakPhotonsVILik",
                                    "peakPhotonsVILikSigma", "peakPhotonsSum",
                                    "peakPhotonsSumSigma")},
    "peakBackgroundVI": "photons per pixel", "peakBackgroundVISigma": "photons per pixel",
    "peakProfileXPosRaw": "pixel (0-based pixel centre, raw slab)",
    "peakProfileYPosRaw": "pixel (0-based pixel centre, raw slab)",
    "peakProfileSigmaX": "pixel", "peakProfileSigmaY": "pixel",
}

Tick = Callable[[int], None]


#: What a run keeps of each spot for its plot (:data:`~.api.INTEGRATION_DTYPE` fields): the VI
#: likelihood's photons and sigma, the summation's (float32: 16 bytes a spot).
PLOTTED = ("lik_photons", "lik_sigma", "sum_photons", "sum_sigma")


@dataclasses.dataclass
class RunStats:
    """What a run integrated, for its closing summary and plot: the spots, the crystals a
    stream holds (none is worth saying: nothing is integrated), the gains used, each spot's
    I/sigma and its :data:`PLOTTED` estimates, and where the plot was written."""

    spots: int = 0
    crystals: int = 0
    kept: int = 0  # outputs an earlier run finished, skipped (their inputs unchanged)
    gains: set[float] = dataclasses.field(default_factory=set)
    snr: list[np.ndarray] = dataclasses.field(default_factory=list)
    estimates: list[np.ndarray] = dataclasses.field(default_factory=list)
    plot: Path | None = None

    def add(self, table: np.ndarray, gain: float) -> None:
        """Count one call's integrated spots (:data:`~.api.INTEGRATION_DTYPE` rows)."""
        self.spots += len(table)
        self.gains.add(float(gain))
        with np.errstate(divide="ignore", invalid="ignore"):
            self.snr.append(table["photons"] / table["photons_sigma"])
        self.estimates.append(np.stack([table[name] for name in PLOTTED]).astype(np.float32))

    def plotted(self) -> dict[str, np.ndarray]:
        """This run's spots' :data:`PLOTTED` estimates, one array each, in integration
        order."""
        rows = (np.concatenate(self.estimates, axis=1) if self.estimates
                else np.zeros((len(PLOTTED), 0), np.float32))
        return dict(zip(PLOTTED, rows, strict=True))

    def median_snr(self) -> float:
        """Median posterior I/sigma of the spots with an estimate (NaN: none)."""
        values = np.concatenate(self.snr) if self.snr else np.zeros(0)
        values = values[np.isfinite(values)]
        return float(np.median(values)) if values.size else float("nan")


class RunGain:
    """The detector gain (ADU per photon) of one integration run, resolved as the finder does.

    Why one rule: the likelihood counts a spot's shot noise as ``gain x photons``, so a gain of
    1 where the detector makes 30 ADU a photon reports ADU as photons and I/sigma several times
    too high.  Files often declare exactly that placeholder (CBF's nominal 1 on integrating
    detectors, ``adu_per_eV = 1`` in CrystFEL geometries), and the same image must give the
    same photons whether it arrives as a DIALS table, a CXI peak table or a stream.  So: the
    user's ``--adu-per-photon`` wins; else the declared gain (the geometry's, or the format's
    for DIALS, as :func:`peaknet_xtal.finding.settings.resolve_gain` reads it) unless it is
    missing or a placeholder (:func:`peaknet_xtal.finding.gain.is_placeholder`), in which case
    the run's background measures it (:class:`peaknet_xtal.finding.gain.GainResolver`: the
    first frames' estimates, then fixed).  One log line says which gain and why, once per gain.
    """

    def __init__(self, override: float | None) -> None:
        from peaknet_xtal.finding.gain import GainResolver

        self.override = None if override is None else float(override)
        self._measure = GainResolver()
        self._said: set[float] = set()

    def __call__(self, declared: float | None, panels: Any, masks: Any, path: Any,
                 origin: str = "the geometry", dtype: Any = None) -> float:
        """Gain for one frame; ``declared`` is what ``origin`` says (None: nothing).  A
        FormatError naming ``path`` when no gain can be had, since the likelihood needs one."""
        from peaknet_xtal.finding.gain import is_placeholder
        from peaknet_xtal.finding.sanitise import sanitise_frame

        why = None
        if self.override is not None:
            gain: float | None = self.override
            why = f"{self.override:g} ADU per photon, as given (--adu-per-photon)"
        elif declared is not None and declared > 0 and not is_placeholder(declared):
            gain = float(declared)
            why = f"declared gain {declared:g} ADU per photon ({origin}'s)"
        else:  # missing or a placeholder: measured (the resolver logs which and why)
            # a gap's marked values are no background (``dtype``: the type the data were stored
            # as, which says what marks them)
            goods = sanitise_frame(panels, masks, dtype)[1]
            gain = self._measure(declared, panels, goods)
        if gain is None:
            raise FormatError(path, f"no detector gain: {origin} declares none and the "
                                    "background does not show one; give --adu-per-photon")
        if not gain > 0:
            raise FormatError(path, f"detector gain {gain:g} ADU/photon is not positive")
        if why is not None and gain not in self._said:
            self._said.add(gain)
            log.info("detector gain: %s", why)
        return gain


def partial_path(out: str | os.PathLike[str]) -> Path:
    """Where an unfinished stream output grows: beside ``out``, hidden, under a fixed name so
    that the next run finds and continues it; renamed to ``out`` only when complete."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


# ---- CXI ---------------------------------------------------------------------------------------

def integrate_cxi(path: str | os.PathLike[str], geometry: Any, out_path: str | os.PathLike[str],
                  integrator: Integrator, *, gain: float | None = None, read_noise: float = 0.0,
                  tick: Tick | None = None, stats: RunStats | None = None) -> Path:
    """Integrate every peak of a CXI file (peaknet2cxi output); write a copy with new columns
    (``stats``, if given, counts what was integrated)."""
    import h5py

    from peaknet_xtal.finding.settings import resolve_gain
    from peaknet_xtal.formats.cxi import PEAK_GROUP, inspect_cxi, iter_cxi_frames, read_cxi_peaks

    path, out = Path(path), Path(out_path)
    gains = RunGain(gain)
    table = read_cxi_peaks(path)
    frames = inspect_cxi(path, geometry).n_frames
    if len(table) != frames:  # the rows past the images were written as NaN, exit 0
        raise FormatError(path, f"its peak table has {len(table)} rows for {frames} frames of "
                          "images: not one peaknet2cxi wrote, or altered since",
                          dataset=f"{PEAK_GROUP}/nPeaks")
    results: dict[str, np.ndarray] = {name: np.full(table.columns["peakXPosRaw"].shape, np.nan)
                                      for name in CXI_COLUMNS}
    for row, frame in enumerate(iter_cxi_frames(path, geometry, stop=len(table))):
        n = int(table.n_peaks[row])
        if n == 0:
            if tick:
                tick(1)
            continue
        peaks = table.peaks(row, geometry)
        wavelength = frame.meta.get("wavelength_A")
        g = gains(resolve_gain(geometry=geometry, wavelength_A=wavelength), frame.panels,
                  frame.masks, path, dtype=frame.meta.get("dtype"))
        bad = peaks["panel"] < 0
        if bad.any():
            raise FormatError(path, f"frame {row}: {int(bad.sum())} peaks lie on no panel of "
                                    "the geometry", dataset=f"{PEAK_GROUP}/peakXPosRaw")
        res = integrator.integrate(frame, peaks["panel"], peaks["fs"], peaks["ss"], gain=g,
                                   read_noise=read_noise, wavelength_A=wavelength)
        if stats is not None:
            stats.add(res, g)
        raw_fs, raw_ss = (geometry.panel_to_raw(peaks["panel"], res["profile_fs"],
                                                res["profile_ss"]) if geometry is not None
                          else (res["profile_fs"], res["profile_ss"]))
        for name, field in CXI_COLUMNS.items():
            values = res[field]
            if field == "profile_fs":
                values = raw_fs
            elif field == "profile_ss":
                values = raw_ss
            results[name][row, :n] = values
        if tick:
            tick(1)
    with atomic_path(out) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as h5:
            group = h5[PEAK_GROUP]
            for name, values in results.items():
                if name in group:
                    del group[name]
                group.create_dataset(name, data=values.astype(np.float32))
                group[name].attrs["units"] = CXI_UNITS[name]
            group.attrs["peaknet_integrator"] = "variational (peaknet_xtal.integration)"
    return out


# ---- CrystFEL streams ----------------------------------------------------------------------

def _image_path(name: str, stream_path: Path) -> Path:
    candidate = Path(name)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return stream_path.parent / candidate


def integrate_stream(path: str | os.PathLike[str], geometry: Any,
                     out_path: str | os.PathLike[str], integrator: Integrator, *,
                     gain: float | None = None, read_noise: float = 0.0,
                     tick: Tick | None = None, stats: RunStats | None = None,
                     fresh: bool = False) -> Path:
    """Re-integrate every crystal's reflections of a stream; write a stream with VI I/sigma(I).

    Images are read from the chunk's ``Image filename`` (relative to the stream's folder if not
    found as given) and ``Event`` (``//N`` is frame N of a stack).  Atomic and resumable: the
    stream grows under :func:`partial_path` and is renamed to ``out_path`` only when complete,
    so the final name never holds half a stream; after a failure the frames written so far stay
    there (the partial file is removed if it holds none), and the next run cuts it after its
    last complete chunk and continues.  An existing ``out_path`` is continued from a copy,
    unless ``fresh`` (its input changed since: its frames are stale), which starts anew and
    replaces it when complete.  ``stats``, if given, counts crystals and integrated spots.
    """
    from peaknet_xtal.formats.stream import Chunk, StreamHeader, StreamWriter, iter_stream

    path, out = Path(path), Path(out_path)
    items = iter_stream(path)
    header = next(items, None)
    if not isinstance(header, StreamHeader):
        raise FormatError(path, "no stream header")
    if geometry is None:
        geometry = header.geometry
    if geometry is None:
        raise FormatError(path, "the stream carries no geometry; give one with -g")
    lookup = geometry.panel_index()
    gains = RunGain(gain)
    part = partial_path(out)
    if fresh:
        part.unlink(missing_ok=True)
    elif out.exists() and not part.exists():
        # a finished (or an older version's interrupted) output: continue a copy of it, so the
        # final name keeps a whole stream until the new one is complete
        shutil.copyfile(out, part)
    writer = StreamWriter(part, header=header, resume=True)
    try:
        done = writer.done_keys()
        for chunk in items:
            if not isinstance(chunk, Chunk):
                continue  # a repeated header of a concatenated stream
            if stats is not None:
                stats.crystals += len(chunk.crystals or [])
            if chunk.key in done:
                if tick:
                    tick(1)
                continue
            if chunk.crystals and any(x.n_reflections for x in chunk.crystals):
                _integrate_chunk(chunk, path, geometry, lookup, integrator, gains, read_noise,
                                 stats)
            writer.write(chunk)
            if tick:
                tick(1)
    except BaseException:
        writer.close()
        if writer.count == 0 and writer.existing_chunks == 0:
            part.unlink(missing_ok=True)  # a header alone: nothing worth keeping
        else:
            log.info("%s: the %d frames written so far are kept in %s; the same command "
                     "continues from there", out, writer.count + writer.existing_chunks, part)
        raise
    writer.close()  # flushed and synced before the rename, so the final name is whole
    os.replace(part, out)
    return out


def _integrate_chunk(chunk: Any, path: Path, geometry: Any, lookup: dict[str, int],
                     integrator: Integrator, gains: RunGain, read_noise: float,
                     stats: RunStats | None = None) -> None:
    """Put VI intensities into the reflection lists of one chunk (in place)."""
    from peaknet_xtal.finding.settings import resolve_gain
    from peaknet_xtal.formats.cxi import read_cxi_event
    from peaknet_xtal.formats.geometry import HC_EV_A

    event = (chunk.event or "//").strip()
    image = _image_path(chunk.filename, path)
    if not image.exists():
        # the stream's line names the image: say both, the user knows which to look for
        raise FormatError(path, f"image {image} not found (the chunk's Image filename)",
                          line=chunk.line)
    try:  # //N, //, or a placeholder file's tag_7//
        frame = read_cxi_event(image, event, geometry)
    except IndexError as exc:  # the stream names a frame the image does not hold
        raise FormatError(path, f"event {event!r} of {image}: {exc}", line=chunk.line) from None
    wavelength = (HC_EV_A / chunk.photon_energy_eV if chunk.photon_energy_eV
                  else frame.meta.get("wavelength_A"))
    g = gains(resolve_gain(geometry=geometry, wavelength_A=wavelength), frame.panels,
              frame.masks, path, dtype=frame.meta.get("dtype"))
    # Every crystal's reflections of the frame in one call, so that reflections of
    # different crystals that share pixels are each other's neighbours.
    crystals = [c for c in chunk.crystals if c.reflections is not None and len(c.reflections)]
    parts = []
    mins = np.array([[p.min_fs, p.min_ss] for p in geometry.panels], float)
    for refl in (c.reflections for c in crystals):
        try:
            panel = np.array([lookup[name] for name in refl["panel"]], np.int32)
        except KeyError as exc:
            raise FormatError(path, f"panel {exc.args[0]!r} is not in the geometry",
                              line=chunk.line) from None
        parts.append((panel, refl["fs"] - 0.5 - mins[panel, 0],
                      refl["ss"] - 0.5 - mins[panel, 1]))
    res = integrator.integrate(
        frame, *(np.concatenate([q[k] for q in parts] or [np.zeros(0)]) for k in range(3)),
        gain=g, read_noise=read_noise, wavelength_A=wavelength)
    if stats is not None:
        stats.add(res, g)
    start = 0
    for crystal in crystals:
        refl = crystal.reflections
        rows = slice(start, start + len(refl))
        start += len(refl)
        refl["I"] = res["lik_photons"][rows] * g
        refl["sigma"] = res["lik_sigma"][rows] * g
        refl["background"] = res["background"][rows] * g
        # a reflection nothing was measured of (no usable pixel: NaN, counted in the log) is
        # left out, as CrystFEL writes no reflection whose integration failed: a merger reads
        # every listed one as a measurement, and a "nan" row would enter its sums
        measured = np.isfinite(refl["I"]) & np.isfinite(refl["sigma"])
        if not measured.all():
            crystal.reflections = refl[measured]
            if crystal.num_reflections is not None:
                crystal.num_reflections = int(measured.sum())


# ---- DIALS ---------------------------------------------------------------------------------

def _resolution(table: Any, ids: np.ndarray, experiments: Any) -> np.ndarray:
    """d (Angstrom) per row: the table's own, else from the crystals' cells for indexed rows;
    NaN where unknown (unindexed rows, id -1, as a raw ``indexed.refl`` holds; experiments
    without a crystal).  The integrator then takes 1/d as unknown (0)."""
    from dials.array_family import flex

    if "d" in table:
        return np.asarray(table["d"].as_numpy_array(), dtype=float)
    d = np.full(len(ids), np.nan)
    indexed = ids >= 0
    if ("miller_index" in table and indexed.any()
            and all(e.crystal is not None for e in experiments)):
        subset = table.select(flex.bool(indexed.tolist()))
        d[indexed] = np.asarray(subset.compute_d(experiments).as_numpy_array())
    return d


def _image_name(imageset: Any) -> str | None:
    paths = list(imageset.paths()) if hasattr(imageset, "paths") else []
    return str(paths[0]) if paths else None


def _check_images(expt_path: str | os.PathLike[str], experiments: Any) -> None:
    """A FormatError naming the first image of ``experiments`` that is not on disk: dxtbx's own
    error for it is a wrapped FileNotFoundError that calls the .expt unreadable."""
    for imageset in experiments.imagesets():
        for image in (imageset.paths() if hasattr(imageset, "paths") else []):
            if image and not os.path.exists(image):
                raise FormatError(expt_path, f"image {image} not found (named by this "
                                             "experiment list)")


def integrate_dials(expt_path: str | os.PathLike[str], refl_path: str | os.PathLike[str],
                    out_path: str | os.PathLike[str], integrator: Integrator, *,
                    gain: float | None = None, read_noise: float = 0.0,
                    tick: Tick | None = None, stats: RunStats | None = None) -> Path:
    """Integrate the predicted reflections (``xyzcal.px``) of indexed DIALS stills.

    Gain (:class:`RunGain`): ``gain`` if given, else the format's declared gain, measured from
    the image's background where that is a placeholder (CBF's nominal 1).  Writes a copy of the
    ``.refl`` with ``intensity.vi.*``, ``background.vi.mean`` and ``intensity.vsum.*`` columns;
    rows of no
    experiment (id -1: unindexed spots of an ``indexed.refl``) keep NaN there.
    """
    from dials.array_family import flex

    from peaknet_xtal.finding.settings import resolve_gain
    from peaknet_xtal.formats.dials_tables import load_reflection_table, read_experiments
    from peaknet_xtal.types import Frame

    _check_images(expt_path, read_experiments(expt_path))
    experiments = read_experiments(expt_path, check_format=True)
    table = load_reflection_table(refl_path)
    gains = RunGain(gain)
    for column in ("xyzcal.px", "panel", "id"):
        if column not in table:
            raise FormatError(refl_path, f"no {column!r} column: integrate needs the predicted "
                                         "positions of an indexed or refined table")
    n = len(table)
    columns = {name: np.full(n, np.nan) for name in ("photons", "photons_sigma", "lik_photons",
                                                     "lik_sigma", "background", "sum_photons",
                                                     "sum_sigma", "profile_fs", "profile_ss")}
    ids = np.asarray(table["id"].as_numpy_array())
    xyz = np.asarray(table["xyzcal.px"].parts()[0].as_numpy_array()), np.asarray(
        table["xyzcal.px"].parts()[1].as_numpy_array())
    panels = np.asarray(table["panel"].as_numpy_array()).astype(np.int32)
    d = _resolution(table, ids, experiments)
    for eid, experiment in enumerate(experiments):
        rows = np.flatnonzero(ids == eid)
        if rows.size == 0:
            continue
        imageset = experiment.imageset
        try:
            raw = imageset.get_raw_data(0)
            masks = imageset.get_mask(0)
        except Exception as exc:  # dxtbx's own errors (RuntimeError, ...): a damaged image
            raise FormatError(_image_name(imageset) or expt_path, f"cannot read the image of "
                              f"experiment {eid} ({type(exc).__name__}: {exc})") from exc
        images = [np.asarray(r.as_numpy_array(), dtype=np.float32) for r in raw]
        good = [np.asarray(m.as_numpy_array(), dtype=bool) for m in masks]
        # raw data are ADU; the format's gain is declared per panel (one value on the detectors
        # DIALS stills come from)
        declared = resolve_gain(meta={"adu_per_photon": experiment.detector[0].get_gain()})
        g = gains(declared, images, good, _image_name(imageset) or expt_path,
                  origin="the image format")
        frame = Frame(panels=images, masks=good, source=str(expt_path), event=f"//{eid}")
        with np.errstate(divide="ignore"):
            inv_d = np.where(d[rows] > 0, 1.0 / d[rows], 0.0)
        res = integrator.integrate(frame, panels[rows], xyz[0][rows] - 0.5, xyz[1][rows] - 0.5,
                                   gain=g, read_noise=read_noise, one_over_d=inv_d)
        if stats is not None:
            stats.add(res, g)
        for name in columns:
            columns[name][rows] = res[name]
        if tick:
            tick(1)
    table["intensity.vi.value"] = flex.double(columns["photons"])
    table["intensity.vi.variance"] = flex.double(columns["photons_sigma"] ** 2)
    table["intensity.vi_lik.value"] = flex.double(columns["lik_photons"])
    table["intensity.vi_lik.variance"] = flex.double(columns["lik_sigma"] ** 2)
    table["background.vi.mean"] = flex.double(columns["background"])
    table["intensity.vsum.value"] = flex.double(columns["sum_photons"])
    table["intensity.vsum.variance"] = flex.double(columns["sum_sigma"] ** 2)
    # and in the slots dials.integrate fills, flagged as it flags them, so that dials.export
    # (and dials.scale) take the table as it is: the VI likelihood is profile fitting with the
    # learned profile (intensity.prf, integrated_prf: MTZ column IPR), the box summation
    # replaces dials.find_spots' strong-pixel sums (intensity.sum, integrated_sum: I).  Before,
    # dials.export found no integrated reflection and stopped ('All data has been filtered').
    for slot, (value, sigma), flag in (
            ("prf", ("lik_photons", "lik_sigma"), table.flags.integrated_prf),
            ("sum", ("sum_photons", "sum_sigma"), table.flags.integrated_sum)):
        table[f"intensity.{slot}.value"] = flex.double(columns[value])
        table[f"intensity.{slot}.variance"] = flex.double(columns[sigma] ** 2)
        measured = np.isfinite(columns[value]) & np.isfinite(columns[sigma]) & \
            (columns[sigma] > 0)
        table.unset_flags(flex.bool(~measured), flag)
        table.set_flags(flex.bool(measured), flag)
    if "xyzobs.px.value" not in table:
        # predictions have no observed position; dials.integrate measures one, and
        # dials.export's XDET/YDET need it: the VI profile's centroid (DIALS' pixel-corner
        # origin), on the predicted image
        z = table["xyzcal.px"].parts()[2].as_numpy_array()
        table["xyzobs.px.value"] = flex.vec3_double(list(zip(
            (columns["profile_fs"] + 0.5).tolist(), (columns["profile_ss"] + 0.5).tolist(),
            np.asarray(z).tolist(), strict=True)))
    if not len(table.experiment_identifiers()):
        # dials.predict's table names no experiments; the .expt given with it does, as
        # dials.integrate's output would (dials.export refuses 'Corrupted identifiers' else)
        for eid in sorted(set(int(i) for i in ids if i >= 0)):
            if eid < len(experiments) and experiments[eid].identifier:
                table.experiment_identifiers()[eid] = experiments[eid].identifier
    out = Path(out_path)
    with atomic_path(out) as tmp:
        table.as_file(str(tmp))
    return out
