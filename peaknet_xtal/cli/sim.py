"""peaknet-sim: simulate XFEL stills with exact truth on any CrystFEL geometry.

    peaknet-sim --geometry G.geom -n N --seed S -o DIR [--config cfg.yaml] [--randomise]

Writes DIR/sim.cxi (raw-layout CXI stack with a static mask and the true strong peaks as a CXI
peak table), DIR/sim.geom (numeric clen/photon energy, peak_list keys; `dials.import DIR/sim.cxi`
reads it through the peaknet_dxtbx format), DIR/sim_truth.h5 (every reflection, crystal and peak
mask), DIR/sim.stream (the true crystals as indexamajig would write them) and DIR/sim_config.json.
Frame i uses seed S+i.  Simulation settings (peaknet_xtal.sim.SimConfig fields) go in the config
file's `sim:` section, e.g. `sim: {cell: lysozyme, b_factor: 30, hit_probability: 0.8}`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peaknet_xtal.config import cli_parser, record, resolve_or_exit, setup_logging

DEFAULTS: dict[str, Any] = {"geometry": None, "n": 10, "seed": 0, "output": "sim_out",
                            "name": "sim", "randomise": False, "stream": True, "sim": {}}
TYPES: dict[str, Any] = {"geometry": str | None}


def main(argv: Sequence[str] | None = None) -> int:
    from peaknet_xtal.errors import FormatError
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    parser = cli_parser(__doc__, prog="peaknet-sim")
    parser.add_argument("--geometry", "-g", dest="geometry", help="CrystFEL .geom file")
    parser.add_argument("-n", dest="n", type=int, help="number of frames (default 10)")
    parser.add_argument("--seed", dest="seed", type=int, help="seed of frame 0 (default 0)")
    parser.add_argument("-o", "--output", dest="output", help="output folder")
    parser.add_argument("--name", dest="name", help="file stem (default sim)")
    parser.add_argument("--randomise", dest="randomise", action="store_true",
                        help="varied conditions per frame (training data)")
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    config = resolve_or_exit(parser, DEFAULTS, args, types=TYPES)
    if not config["geometry"]:
        parser.error("--geometry is required")
    try:
        sim_config = SimConfig.from_dict(dict(config["sim"]))
    except (TypeError, ValueError) as exc:
        raise FormatError(getattr(args, "config", None), f"sim section: {exc}") from exc
    out = Path(config["output"])
    record(config, out / f"{config['name']}_config.json", "peaknet-sim", argv)
    paths = simulate_run(read_geometry(config["geometry"]), int(config["n"]), int(config["seed"]),
                         out, sim_config, name=config["name"], randomise=bool(config["randomise"]),
                         stream=bool(config["stream"]))
    for label, path in vars(paths).items():
        if path is not None:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
