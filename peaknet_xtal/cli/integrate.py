"""peaknet-integrate: photons per spot with posterior uncertainties (variational integrator).

    peaknet-integrate peaks/*.cxi -g detector.geom -o integrated/      # peaknet2cxi output
    peaknet-integrate run.stream -o integrated/ [-g detector.geom]     # indexamajig output
    peaknet-integrate indexed.expt --refl indexed.refl -o integrated/  # DIALS stills

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
  background.vi.mean, intensity.vsum.* (summation).

The detector gain (ADU per photon) comes from the geometry (adu_per_photon or adu_per_eV) unless
--adu-per-photon is given; --read-noise is the Gaussian read noise in photons (default 0).
A placeholder declared gain (1, as CBF formats and many geometries declare; or adu_per_eV = 1)
is replaced by the gain measured from the background, as peaknet2cxi does; the log says which gain
is used and why.  Frames must be pedestal-corrected.

Outputs appear under their final names only when complete.  Reruns skip finished CXI and DIALS
outputs; a stream grows in a hidden .NAME.partial beside its output, kept after a failure, and
the same command continues it after its last complete chunk.  A bad input (a missing or damaged
file or image, a table without positions, no gain) ends the run with one line naming the file
and the problem, exit status 1.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peaknet_xtal.config import cli_parser, record, resolve_or_exit, setup_logging

log = logging.getLogger("peaknet_xtal")

DEFAULTS: dict[str, Any] = {"inputs": [], "geometry": None, "refl": None, "output": "integrated",
                            "weights": "default", "device": "cpu", "adu_per_photon": None,
                            "read_noise": 0.0, "batch_size": 4096, "progress": True}
CONFIG_NAME = "integrate_config.json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli_parser(__doc__, prog="peaknet-integrate")
    parser.add_argument("inputs", nargs="*", help=".cxi/.h5 peak files, .stream, or .expt")
    parser.add_argument("-g", "--geometry", dest="geometry", help="CrystFEL .geom")
    parser.add_argument("--refl", dest="refl", help="DIALS .refl beside an .expt input")
    parser.add_argument("-o", "--output", dest="output", help="output folder")
    parser.add_argument("--weights", dest="weights", help="integrator .safetensors (default: "
                                                          "the shipped one)")
    parser.add_argument("--device", dest="device", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--adu-per-photon", dest="adu_per_photon", type=float,
                        help="detector gain, overriding the geometry's")
    parser.add_argument("--read-noise", dest="read_noise", type=float,
                        help="Gaussian read noise in photons (default 0)")
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    config = resolve_or_exit(parser, DEFAULTS, args)
    if not config["inputs"]:
        parser.error("give at least one input file")
    from peaknet_xtal.errors import PeakNetError

    try:
        record(config, Path(config["output"]) / CONFIG_NAME, "peaknet-integrate", argv)
        outputs = run(config)
    except (PeakNetError, OSError) as exc:
        # a user's error (a bad or missing file, no gain) or the system's (a full disk): the
        # message names the file and the problem; a traceback would only bury it
        print(f"peaknet-integrate: error: {exc}", file=sys.stderr)
        return 1
    for path in outputs:
        print(path)
    return 0


def _kind(path: Path) -> str:
    from peaknet_xtal.errors import FormatError
    from peaknet_xtal.formats.cxi import CXI_SUFFIXES

    suffix = path.suffix.lower()
    if suffix == ".stream":
        return "stream"
    if suffix == ".expt":
        return "dials"
    if suffix in CXI_SUFFIXES:
        return "cxi"
    raise FormatError(path, "not a CXI/HDF5 peak file, a CrystFEL .stream or a DIALS .expt")


def run(config: Mapping[str, Any]) -> list[Path]:
    """Integrate every input; returns the output paths (finished ones are kept, not redone)."""
    from peaknet_xtal.errors import FormatError
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.integration import Integrator
    from peaknet_xtal.integration.files import integrate_cxi, integrate_dials, integrate_stream
    from peaknet_xtal.progress import Progress

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
    integrator = Integrator(config["weights"], device=str(config["device"]),
                            batch_size=int(config["batch_size"]))
    out_dir = Path(config["output"])
    options = {"gain": config["adu_per_photon"], "read_noise": float(config["read_noise"])}
    outputs = []
    with Progress(None, "frames", desc="peaknet-integrate",
                  enabled=bool(config["progress"])) as bar:
        for path, kind in zip(inputs, kinds, strict=False):
            if kind == "dials":
                out = out_dir / f"{Path(config['refl']).stem}_vi.refl"
            else:
                out = out_dir / path.name
            if out.exists() and kind != "stream":  # a stream is continued, see the docstring
                log.info("%s exists: skipped (delete it to integrate %s again)", out, path)
                outputs.append(out)
                continue
            if kind == "cxi":
                integrate_cxi(path, geometry, out, integrator, tick=bar.update, **options)
            elif kind == "stream":
                integrate_stream(path, geometry, out, integrator, tick=bar.update, **options)
            else:
                integrate_dials(path, config["refl"], out, integrator, tick=bar.update,
                                **options)
            outputs.append(out)
    return outputs


if __name__ == "__main__":
    raise SystemExit(main())
