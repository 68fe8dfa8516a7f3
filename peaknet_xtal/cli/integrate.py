"""peaknet-integrate: photons per spot with posterior uncertainties (variational integrator).

    peaknet-integrate peaks/*.cxi -g detector.geom -o integrated/      # peaknet2cxi output
    peaknet-integrate run.stream -o integrated/ [-g detector.geom]     # indexamajig output
    dials.predict indexed.expt                                        # DIALS stills: every
    peaknet-integrate indexed.expt --refl predicted.refl -o integrated/ # predicted reflection

Every spot (a found peak of a CXI peak table, a predicted reflection of a stream's crystals or of
a DIALS table) gets a 15x15-pixel shoebox, integrated by the shipped variational integrator
(--weights to use another) and by background-subtracted summation over the same box.  Outputs,
written atomically under the output folder with the input's name:

- CXI: a copy of the file with new peak columns (peakPhotonsVI, peakPhotonsVISigma: posterior;
  peakPhotonsVILik(Sigma): the likelihood alone, for mergers; peakBackgroundVI(Sigma),
  peakProfile{X,Y}PosRaw, peakProfileSigma{X,Y}, peakPhotonsSum(Sigma));
- stream: the same stream with each reflection's I and sigma(I) from the VI likelihood alone (what
  a merger with its own prior should read: no integrator prior in it) and its background
  (detector units, photons x gain, as indexamajig writes them), ready for a merger;
- DIALS: the .refl with intensity.vi.value/variance (the posterior: the best estimate of a spot
  on its own), intensity.vi_lik.value/variance (the likelihood alone: what to merge),
  background.vi.mean, intensity.vsum.* (summation); the likelihood and the summation also in
  dials.integrate's slots, intensity.prf.* and intensity.sum.*, flagged integrated_prf and
  integrated_sum, so that dials.export writes them (MTZ IPR and I) from the table as it is.
  A table integrates the rows it holds: indexed.refl holds the spots that were found, so give
  dials.predict's output to integrate every predicted reflection (merging found spots alone
  reads weak reflections high).

The detector gain (ADU per photon) comes from the geometry (adu_per_photon or adu_per_eV) unless
--adu-per-photon is given; --read-noise is the Gaussian read noise in photons (default 0).
A placeholder declared gain (1, as CBF formats and many geometries declare; or adu_per_eV = 1)
is replaced by the gain measured from the background, as peaknet2cxi does; the log says which gain
is used and why.  Frames must be pedestal-corrected.

Outputs appear under their final names only when complete.  Reruns skip finished CXI and DIALS
outputs (an input changed since its output was written is integrated again); a stream grows in a
hidden .NAME.partial beside its output, kept after a failure, Ctrl-C (exit status 130) or a
batch scheduler's SIGTERM (143), and
the same command continues it after its last complete chunk.  An output folder holds one run's
settings: a rerun whose geometry, --refl, --weights, --adu-per-photon or --read-noise differ from
those recorded in OUTPUT/integrate_config.json is refused, naming each difference, before
anything is written.  Every setting is checked before any work (a usage error naming the option,
exit status 2).  A bad input (a missing or damaged file or image, a table without positions, no
gain) ends the run with one line naming the file and the problem, exit status 1.

A run that integrated spots draws them in OUTPUT/integrate.png: a histogram of the VI
likelihood's I/sigma (the summation's outlined over it), and the VI likelihood's photons against
the background-subtracted summation's, spot by spot, with the identity line (this run's spots; a
rerun that integrates nothing keeps the earlier picture).  The run ends with one summary line:
spots integrated, the gain used, the median posterior I/sigma, the plot.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peaknet_xtal.config import (
    DEVICE,
    bounded,
    cli_parser,
    record,
    resolve_or_exit,
    setting_differences,
    setup_logging,
    validate,
)
from peaknet_xtal.errors import FormatError
from peaknet_xtal.stopping import exit_status, interrupted, sigterm_raises

log = logging.getLogger("peaknet_xtal")

DEFAULTS: dict[str, Any] = {"inputs": [], "geometry": None, "refl": None, "output": "integrated",
                            "weights": "default", "device": "cpu", "adu_per_photon": None,
                            "read_noise": 0.0, "batch_size": 4096, "threads": None,
                            "progress": True}
#: Ranges and kinds of the settings whose default cannot say them (see config.resolve).
TYPES: dict[str, Any] = {"geometry": str | None, "refl": str | None, "device": DEVICE,
                         "adu_per_photon": bounded(float, gt=0, optional=True),
                         "read_noise": bounded(float, ge=0), "batch_size": bounded(int, ge=1),
                         "threads": bounded(int, ge=1, optional=True)}
CONFIG_NAME = "integrate_config.json"
#: Which input each output was made from (path, size, modification time), so that a rerun
#: skips only outputs of unchanged inputs.
INPUTS_NAME = "integrate_inputs.json"
#: Settings that change the numbers written: a folder's outputs must share them.  The others
#: (inputs, output, device, batch size, threads, progress) may differ between the runs of one
#: folder.
SAME_RUN = ("geometry", "refl", "weights", "adu_per_photon", "read_noise")
PROG = "peaknet-integrate"
#: The run's spots drawn (:func:`write_run_plot`).
PLOT_NAME = "integrate.png"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli_parser(__doc__, prog=PROG)
    parser.add_argument("inputs", nargs="*", help=".cxi/.h5 peak files, .stream, or .expt")
    parser.add_argument("-g", "--geometry", dest="geometry", help="CrystFEL .geom")
    parser.add_argument("--refl", dest="refl", help="DIALS .refl beside an .expt input")
    parser.add_argument("-o", "--output", dest="output",
                        help="output folder (default: integrated)")
    parser.add_argument("--weights", dest="weights", help="integrator .safetensors (default: "
                                                          "the shipped one)")
    parser.add_argument("--device", dest="device", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--adu-per-photon", dest="adu_per_photon", type=float,
                        help="detector gain, overriding the geometry's")
    parser.add_argument("--read-noise", dest="read_noise", type=float,
                        help="Gaussian read noise in photons (default 0)")
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--threads", dest="threads", type=int,
                        help="torch CPU threads (default: the cores free for this process, as "
                        "peaknet2cxi; more than are free ran 3-4 times slower on a busy machine)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    config = resolve_or_exit(parser, DEFAULTS, args, types=TYPES)
    if not config["inputs"]:
        parser.error("give at least one input file")
    from peaknet_xtal.finding.settings import check_device

    try:  # the finder's check: a string torch does not know, a GPU this machine lacks
        check_device(config["device"])
    except ValueError as exc:  # a GPU this machine does not have: a usage error, before work
        parser.error(f"--device: {exc}")
    from peaknet_xtal.errors import PeakNetError
    from peaknet_xtal.integration.files import RunStats

    out = Path(config["output"])
    stats = RunStats()
    try:
        check_outputs_are_not_inputs(config)
        check_dials_inputs(config)
        # the folder's earlier run is compared before this run's settings are recorded over it
        digests = _contents(config)  # each file read once, for the check and the record
        check_output_folder(out, config, digests)
        record({**config, **digests}, out / CONFIG_NAME, PROG, argv)
        with sigterm_raises():  # a batch scheduler's stop, as Ctrl-C: the chunks done stay
            outputs = run(config, stats)
    except KeyboardInterrupt as exc:
        print(f"{PROG}: {interrupted(exc)}; finished outputs are kept in {out}, and the same "
              "command continues (a stream from its last complete frame)", file=sys.stderr)
        return exit_status(exc)
    except (PeakNetError, OSError) as exc:
        # a user's error (a bad or missing file, no gain) or the system's (a full disk): the
        # message names the file and the problem; a traceback would only bury it
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    for path in outputs:
        print(path)
    print(summary_line(stats))
    return 0


def summary_line(stats: Any) -> str:
    """One line closing a run: spots integrated this run, gain(s) used, median I/sigma."""
    if not stats.spots:
        kept = (f" ({stats.kept} output(s) an earlier run finished are kept)" if stats.kept
                else "")
        return f"{PROG}: no spots integrated this run{kept}"
    gains = sorted(stats.gains)
    gain = (f"{gains[0]:.3g}" if len(gains) == 1 else f"{gains[0]:.3g}-{gains[-1]:.3g}")
    plot = f"; I/sigma and VI against summation: {stats.plot}" if stats.plot else ""
    return (f"{PROG}: {stats.spots} spots integrated, gain {gain} ADU/photon, median I/sigma "
            f"{stats.median_snr():.1f} (VI posterior){plot}")


def write_run_plot(out_dir: Path, stats: Any) -> Path | None:
    """``OUTPUT/integrate.png`` of this run's spots (``RunStats.plotted``): the VI
    likelihood's I/sigma, and its photons against summation's
    (:func:`~peaknet_xtal.run_plots.integration_figure`).  None, after one warning, where it
    cannot be written: the run's outputs stand without it."""
    from peaknet_xtal.run_plots import integration_figure, write_plot

    spots = stats.plotted()
    title = f"{PROG}: {out_dir}: {stats.spots} spots integrated this run"
    return write_plot(out_dir / PLOT_NAME, lambda: integration_figure(
        spots["lik_photons"], spots["lik_sigma"], spots["sum_photons"], spots["sum_sigma"],
        title=title))


def _absolute(value: Any, cwd: str | None) -> Any:
    """A path setting as an absolute path (relative ones against ``cwd``): the same file named
    from another folder is the same setting."""
    if not isinstance(value, str) or value == "default":
        return value
    return os.path.normpath(os.path.join(cwd or os.getcwd(), value))


def _run_settings(config: Mapping[str, Any], cwd: str | None) -> dict[str, Any]:
    return {key: (_absolute(config.get(key), cwd) if key in ("geometry", "refl", "weights")
                  else config.get(key)) for key in SAME_RUN}


#: The settings that name files, compared by their contents where both runs' records have it.
CONTENT_KEYS = ("geometry", "refl")


def check_dials_inputs(config: Mapping[str, Any]) -> None:
    """Raise :class:`~peaknet_xtal.errors.DialsUnavailable`, naming the first .expt input,
    where DIALS is not there or fails to load.  Why before the run: the inputs before it were
    integrated and the .expt then failed with a traceback (No module named 'dxtbx')
    (``formats.dials_tables.check_experiments_readable``: in a child process)."""
    from peaknet_xtal.formats.dials_tables import check_experiments_readable

    expt = next((p for p in config["inputs"] if Path(p).suffix.lower() == ".expt"), None)
    if expt is not None:
        check_experiments_readable(expt)


def _contents(config: Mapping[str, Any]) -> dict[str, str]:
    """``{"geometry_sha256": ..., "refl_sha256": ...}`` of the files the run is given, for its
    record (a file that cannot be read is left to the run to report)."""
    import hashlib

    digests = {}
    for key in CONTENT_KEYS:
        if config.get(key):
            try:
                digests[f"{key}_sha256"] = hashlib.sha256(Path(config[key]).read_bytes()) \
                    .hexdigest()
            except OSError:
                continue
    return digests


def check_output_folder(out: Path, config: Mapping[str, Any],
                        digests: Mapping[str, str] | None = None) -> None:
    """Refuse an output folder that is a file, or that holds a run made with other settings
    (:data:`SAME_RUN`; each difference named with both values): its outputs would mix two
    gains or two integrators under one record.  A folder with no record, or with nothing but
    the record, takes any settings."""
    if out.exists() and not out.is_dir():
        raise FormatError(out, "is a file, not a folder: -o names the output folder")
    path = out / CONFIG_NAME
    if not path.is_file() or not any(p.name != CONFIG_NAME for p in out.iterdir()):
        return
    try:
        earlier = json.loads(path.read_text())
        settings, cwd = earlier["config"], earlier.get("cwd")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(path, f"cannot read the earlier run's record ({exc}); use another "
                                "output folder (-o)") from None
    then, now = _run_settings(settings, cwd), _run_settings(config, None)
    digests = _contents(config) if digests is None else digests
    for key in CONTENT_KEYS:
        # a file is its contents where the record has them: a copy of the geometry at another
        # path is the same setting, the same path with other contents (a gain edited) is not;
        # an older record names its files only, compared by path
        was, is_now = settings.get(f"{key}_sha256"), digests.get(f"{key}_sha256")
        if was and is_now:
            then[key] = f"{then[key]} (SHA-256 {was[:12]})" if was != is_now else None
            now[key] = f"{now[key]} (SHA-256 {is_now[:12]})" if was != is_now else None
    differences = setting_differences(then, now)
    if differences:
        raise FormatError(out, "holds outputs integrated with other settings ("
                          + "; ".join(differences) + "); one output folder holds one run's "
                          "settings: use another output folder (-o) for these, or the same "
                          "settings to continue this run (what is in it is kept)")


def _output(path: Path, config: Mapping[str, Any]) -> Path:
    """Where an input's output is written: under the output folder with the input's name (a
    DIALS .expt's: its --refl name with ``_vi``)."""
    out_dir = Path(config["output"])
    if path.suffix.lower() == ".expt" and config.get("refl"):
        return out_dir / f"{Path(config['refl']).stem}_vi.refl"
    return out_dir / path.name


def _identity(path: Path) -> tuple[int, int] | None:
    """What makes two names one file (device and inode, as ``os.path.samefile`` compares);
    None for a file that is not there (an output not written yet)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def check_outputs_are_not_inputs(config: Mapping[str, Any]) -> None:
    """Refuse an output that is an input (-o the folder that holds the inputs), before anything
    is written: a CXI input was taken for its own finished output (skipped, with advice to
    delete it) and a stream's chunks for chunks already integrated, so the run did nothing and
    exited 0.  Each output is compared with every input: of two inputs named alike, the one
    in the output folder would be the other's output.  One stat a file, so a run of thousands
    of inputs is checked at once."""
    inputs = [Path(p) for p in config["inputs"]]
    identities = [_identity(p) for p in inputs]
    owners: dict[tuple[int, int] | None, Path] = {}
    for identity, path in zip(identities, inputs, strict=True):
        if identity is not None:
            owners.setdefault(identity, path)  # the first name given, as it is listed
    taken: dict[Path, tuple[Path, tuple[int, int] | None]] = {}
    for path, identity in zip(inputs, identities, strict=True):
        out = _output(path, config)
        source = owners.get(_identity(out))  # an output not there yet is no input
        if source is not None:
            raise FormatError(source, f"the output ({out}) would be this input itself: "
                              "choose another output folder (-o)")
        first, first_identity = taken.setdefault(out, (path, identity))
        if first != path and (identity is None or identity != first_identity):
            # one output for two inputs: the second overwrote the first's (CXI), or its
            # chunks were taken for the first's, already done (stream), without a word
            raise FormatError(path, f"has the name of another input ({first}); both would be "
                              f"written to {out}: integrate them into separate output folders")


def _kind(path: Path) -> str:
    from peaknet_xtal.formats.cxi import CXI_SUFFIXES

    if path.is_dir():
        raise FormatError(path, "is a folder, not an input file")
    suffix = path.suffix.lower()
    if suffix == ".stream":
        return "stream"
    if suffix == ".expt":
        return "dials"
    if suffix in CXI_SUFFIXES:
        return "cxi"
    raise FormatError(path, "not a CXI/HDF5 peak file, a CrystFEL .stream or a DIALS .expt")


def _fingerprint(path: Path) -> dict[str, Any]:
    """What identifies an input's version cheaply (no hashing of GB files): its absolute path,
    size and modification time (``formats.cxi.file_identity``, as peaknet2cxi's CXI files
    record theirs); a regenerated file differs in the last."""
    from peaknet_xtal.formats.cxi import file_identity

    identity = file_identity(path)
    if identity is None:
        raise FormatError(path, "cannot read it (not found, or not a file)")
    return dict(zip(("input", "size", "mtime_ns"), identity, strict=True))


def _read_inputs(out_dir: Path) -> dict[str, Any]:
    try:
        made = json.loads((out_dir / INPUTS_NAME).read_text())
    except (OSError, ValueError):  # none yet (or an older version's folder): nothing known
        return {}
    return made if isinstance(made, dict) else {}


def _count(path: Path, kind: str) -> int | None:
    """Ticks an input will give (frames of a CXI file or a stream, experiments of an .expt),
    where they are cheap to count; None where not (the progress then shows no total)."""
    try:
        if kind == "cxi":
            import h5py

            from peaknet_xtal.formats.cxi import PEAK_GROUP

            with h5py.File(path, "r") as h5:
                return int(h5[f"{PEAK_GROUP}/nPeaks"].shape[0])
        if kind == "stream":
            from peaknet_xtal.formats.stream import CHUNK_BEGIN

            begin = CHUNK_BEGIN.encode()
            with open(path, "rb") as handle:
                return sum(line.startswith(begin) for line in handle)
        return len(json.loads(path.read_text()).get("experiment", []))
    except (OSError, KeyError, ValueError, AttributeError):
        return None  # a damaged input: integrating it says what is wrong, naming it


def run(config: Mapping[str, Any], stats: Any = None) -> list[Path]:
    """Integrate every input; returns the output paths (finished ones are kept, not redone,
    unless their input changed since).  ``stats`` (a ``RunStats``) counts what was done."""
    from peaknet_xtal.atomic import write_json_atomic
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.integration import Integrator
    from peaknet_xtal.integration.files import (
        RunStats,
        integrate_cxi,
        integrate_dials,
        integrate_stream,
    )
    from peaknet_xtal.progress import Progress

    # checked here too, for Python callers (a ConfigError names the setting)
    config = validate({**DEFAULTS, **config}, DEFAULTS, TYPES, [("run() arguments", config)])
    stats = RunStats() if stats is None else stats
    inputs = [Path(p) for p in config["inputs"]]
    kinds = []
    for path in inputs:
        if not path.exists():
            raise FormatError(path, "file not found")
        kinds.append(_kind(path))
    geometry = read_geometry(config["geometry"]) if config["geometry"] else None
    if "cxi" in kinds and geometry is None:
        raise FormatError(inputs[kinds.index("cxi")], "CXI peak tables need the detector "
                                                      "geometry (-g)")
    if "dials" in kinds and not config["refl"]:
        raise FormatError(inputs[kinds.index("dials")], "a DIALS .expt needs its .refl (--refl)")
    check_dials_inputs(config)  # main() checks it before the record is written
    check_outputs_are_not_inputs(config)  # for Python callers; main() checks before writing
    out_dir = Path(config["output"])
    made = _read_inputs(out_dir)
    plan = []  # (input, kind, output, whether its input changed since the output was made)
    outputs = []
    for path, kind in zip(inputs, kinds, strict=True):
        out = _output(path, config)
        outputs.append(out)
        known = made.get(out.name)
        changed = bool(out.exists() and known and known != _fingerprint(path))
        if changed:
            log.info("%s: its input %s changed since it was written: integrating it again",
                     out, path)
        elif out.exists() and kind != "stream":  # a stream is continued, see the docstring
            log.info("%s exists: skipped (delete it to integrate %s again)", out, path)
            stats.kept += 1
            continue
        plan.append((path, kind, out, changed))
    if not plan:
        return outputs
    if not str(config["device"]).startswith("cuda"):
        from peaknet_xtal.threads import use_torch_threads

        use_torch_threads(config["threads"])  # threads that fit the machine, as the finder's
    integrator = Integrator(config["weights"], device=str(config["device"]),
                            batch_size=int(config["batch_size"]))
    options = {"gain": config["adu_per_photon"], "read_noise": float(config["read_noise"])}
    counts = [_count(path, kind) for path, kind, _, _ in plan]
    total = None if None in counts else sum(c for c in counts if c is not None)
    with Progress(total, "frames", desc=PROG, enabled=bool(config["progress"])) as bar:
        for path, kind, out, changed in plan:
            crystals, spots = stats.crystals, stats.spots
            fingerprint = _fingerprint(path)  # before the work: a change during it shows next
            if kind == "cxi":
                integrate_cxi(path, geometry, out, integrator, tick=bar.update, stats=stats,
                              **options)
            elif kind == "stream":
                integrate_stream(path, geometry, out, integrator, tick=bar.update, stats=stats,
                                 fresh=changed, **options)
                if stats.crystals == crystals:
                    log.warning("%s: 0 crystals, nothing integrated (no indexed crystal in the "
                                "stream)", path)
                elif stats.spots == spots:  # crystals, but not one reflection listed
                    log.warning("%s: %d crystal(s) without reflection lists, nothing "
                                "integrated: indexamajig wrote none (--no-refls-in-stream); "
                                "index again without that option", path,
                                stats.crystals - crystals)
            else:
                integrate_dials(path, config["refl"], out, integrator, tick=bar.update,
                                stats=stats, **options)
            made[out.name] = fingerprint
            write_json_atomic(out_dir / INPUTS_NAME, made)
    if stats.spots:  # a run that integrated nothing keeps the earlier run's picture
        stats.plot = write_run_plot(out_dir, stats)
    return outputs


if __name__ == "__main__":
    raise SystemExit(main())
