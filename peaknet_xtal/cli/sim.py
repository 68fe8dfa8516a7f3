"""peaknet-sim: simulate XFEL stills with exact truth on any CrystFEL geometry.

    peaknet-sim --geometry G.geom -n N --seed S -o DIR [--config cfg.yaml] [--randomise]
                [--name NAME] [--overwrite] [--no-progress]

Writes DIR/sim.cxi (raw-layout CXI stack with a static mask and the true strong peaks as a CXI
peak table; a stacked EuXFEL-style layout is stored as one slab, modules one below another, as
peaknet2cxi stores it, since indexamajig places CXI peaks by slab position), DIR/sim.geom
(numeric clen/photon energy, peak_list keys; `dials.import DIR/sim.cxi`
reads it through the peaknet_dxtbx format), DIR/sim_truth.h5 (every reflection, crystal and peak
mask), DIR/sim.stream (the true crystals as indexamajig would write them) and DIR/sim_config.json
(the settings that made them); --name NAME writes NAME.cxi and so on instead.  Frame i uses seed
S+i (N >= 1, S >= 0).  A config file (--config) names the options' settings as the long
options do (`frames: 100`, `seed: 1`, `randomise: true`; `stream: false` and `progress: false`
for --no-stream and --no-progress, which drops the progress line); simulation settings
(peaknet_xtal.sim.SimConfig fields, each checked for its type and range before anything is
written) go in its `sim:` section, e.g. `sim: {cell: lysozyme, b_factor: 30,
hit_probability: 0.8}`.  The command ends by printing the number of frames, hits and strong
peaks, then each file written.

A folder that already holds a run of the same name is left alone and the command fails, unless
--overwrite is given: then the new run replaces the earlier one (whatever its detector), and only
once all of its files are written, so that a run that fails or is interrupted leaves the earlier
one as it was.  Files are written to a hidden folder in DIR and moved into place at the end; a
failed run leaves nothing behind (a killed one may leave its hidden .NAME.*.partial folder, which
can be deleted).  A bad geometry, setting or output folder is one line on stderr naming the file
or setting (exit status 1; 2 for a setting), before anything is written.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from peaknet_xtal.config import bounded, cli_parser, record, resolve_or_exit, setup_logging
from peaknet_xtal.errors import FormatError, PeakNetError


def _file_stem(value: str) -> str:
    """A run name becomes file names in the output folder: no folders in it, not empty."""
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise PydanticCustomError("file_stem", "must be a file name without a folder")
    return value


def _defaults() -> dict[str, Any]:
    """The command's settings; the ``sim`` section is every :class:`SimConfig` field with its
    default, so that a misspelt or mistyped one is an error naming it (config.resolve) and the
    recorded configuration holds every setting the run used."""
    from peaknet_xtal.sim import SimConfig

    return {"geometry": None, "frames": 10, "seed": 0, "output": "sim_out", "name": "sim",
            "randomise": False, "stream": True, "overwrite": False, "progress": True,
            "sim": SimConfig().to_dict()}


def _types() -> dict[str, Any]:
    from peaknet_xtal.sim.config import settings_types

    return {"geometry": str | None, "frames": bounded(int, ge=1), "seed": bounded(int, ge=0),
            "name": Annotated[str, AfterValidator(_file_stem)], **settings_types("sim.")}


def earlier_run(out: Path, name: str) -> list[Path]:
    """The files of a run called ``name`` already in ``out`` (any of them: a partial set is a run
    too), or a FormatError when ``out`` is not a folder."""
    from peaknet_xtal.sim.run import run_paths

    if out.exists() and not out.is_dir():
        raise FormatError(out, "the output must be a folder (-o)")
    paths = [p for p in vars(run_paths(out, name)).values() if p is not None]
    return [p for p in [*paths, out / f"{name}_config.json"] if p.exists()]


def run_counts(truth: Path, seed: int) -> str:
    """The run in numbers, from its truth file: frames (and their seeds), hits, strong peaks.

    Why: the command listed its files only, and whether a run held the hits and peaks it was
    meant to (a hit_probability or a crystal too weak) took opening them."""
    import h5py

    with h5py.File(truth, "r") as h5:  # the run's own, just written: its small frame table
        frames = h5["frames"][()]
    n, hits, strong = len(frames), int(frames["hit"].sum()), int(frames["n_strong"].sum())
    seeds = f"seed {seed}" if n == 1 else f"seeds {seed}-{seed + n - 1}"
    per_hit = f" ({strong / hits:.0f} per hit)" if hits else ""
    return (f"peaknet-sim: {n} frame{'s' if n != 1 else ''} ({seeds}), {hits} "
            f"hit{'s' if hits != 1 else ''}, {strong} strong peak{'s' if strong != 1 else ''}"
            f"{per_hit}")


def main(argv: Sequence[str] | None = None) -> int:
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    parser = cli_parser(__doc__, prog="peaknet-sim")
    parser.add_argument("--geometry", "-g", dest="geometry", help="CrystFEL .geom file")
    parser.add_argument("-n", "--frames", dest="frames", type=int,
                        help="number of frames, >= 1 (default 10)")
    parser.add_argument("--seed", dest="seed", type=int, help="seed of frame 0 (default 0)")
    parser.add_argument("-o", "--output", dest="output", help="output folder")
    parser.add_argument("--name", dest="name", help="file stem (default sim)")
    parser.add_argument("--randomise", dest="randomise", action="store_true",
                        help="varied conditions per frame (training data)")
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    parser.add_argument("--overwrite", dest="overwrite", action="store_true",
                        help="replace an earlier run of the same name in the output folder "
                        "(once the new one is complete)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress line")
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    config = resolve_or_exit(parser, _defaults(), args, types=_types())
    if not config["geometry"]:
        parser.error("--geometry is required")
    out, name = Path(config["output"]), config["name"]
    try:
        sim_config = SimConfig.from_dict(dict(config["sim"]))
        geometry = read_geometry(config["geometry"])
        earlier = earlier_run(out, name)
        if earlier and not config["overwrite"]:
            raise FormatError(out, f"already holds a run named {name!r} "
                              f"({', '.join(p.name for p in earlier)}); nothing was changed: "
                              "add --overwrite to replace it, or choose another -o or --name")
        paths = simulate_run(geometry, int(config["frames"]), int(config["seed"]), out,
                             sim_config, name=name, randomise=bool(config["randomise"]),
                             stream=bool(config["stream"]), progress=bool(config["progress"]),
                             record=lambda staging: record(
                                 config, staging / f"{name}_config.json", "peaknet-sim", argv))
    except KeyboardInterrupt:
        print(f"peaknet-sim: interrupted; {out} is as it was", file=sys.stderr)
        return 130
    except (PeakNetError, OSError, ValueError) as exc:  # a bad geometry, a full disk: one line
        print(f"peaknet-sim: error: {exc}", file=sys.stderr)
        return 1
    if earlier:
        print(f"peaknet-sim: replaced the earlier run {name!r} in {out}", file=sys.stderr)
    print(run_counts(paths.truth, int(config["seed"])))
    for label, path in vars(paths).items():
        if path is not None:
            print(f"{label}: {path}")
    print(f"config: {out / f'{name}_config.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
