"""Find Bragg peaks in any image DIALS can read, from a cctbx/DIALS Python script.

Runs under Debian's DIALS Python (``/usr/bin/python3`` with this project's venv site-packages on
``PYTHONPATH``) or simply the project's venv python::

    python examples/cctbx_peakfinder.py IMAGE.cbf [--threshold 0.5] [--out strong.refl]

It prints one line per image (peaks, hit or not, the strongest peaks) and, with ``--out``, saves
a DIALS strong-spot table that ``dials.index`` accepts directly::

    dials.import IMAGE.cbf && dials.index imported.expt strong.refl
"""
from __future__ import annotations

import argparse

# torch must be imported before cctbx/dxtbx: cctbx's OpenMP stubs otherwise shadow libgomp and
# the engine falls back to a single thread (see peaknet_xtal.threads.openmp_shadowed).
import torch  # noqa: F401  (import order matters, see above)
from dxtbx.model.experiment_list import ExperimentListFactory

from peaknet_xtal.finding import PeakFinder
from peaknet_xtal.finding.api import frame_number, reflection_table
from peaknet_xtal.finding.settings import DEFAULTS
from peaknet_xtal.formats.cxi import DEFAULT_MAX_PEAKS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files (CBF, HDF5/NeXus, SMV, ...)")
    parser.add_argument("--model", default="default", help="model name or weights file")
    parser.add_argument("--threshold", type=float, default=DEFAULTS.threshold,
                        help="peak probability cut")
    parser.add_argument("--min-peaks", type=int, default=DEFAULTS.min_peaks,
                        help="peaks that make a hit")
    parser.add_argument("--max-peaks", type=int, default=DEFAULT_MAX_PEAKS,
                        help="keep the strongest N")
    parser.add_argument("--out", help="save the strong spots of all images as a .refl file")
    args = parser.parse_args(argv)

    finder = PeakFinder(args.model, device="auto", threshold=args.threshold,
                        min_peaks=args.min_peaks, max_peaks=args.max_peaks)
    experiments = ExperimentListFactory.from_filenames(args.images)
    tables = []
    for experiment_id, experiment in enumerate(experiments):
        imageset = experiment.imageset
        for index in range(len(imageset)):
            peaks, boxes = finder.find(imageset, index, with_bbox=True)
            top = peaks[peaks["intensity"].argsort()[::-1][:3]]
            described = ", ".join(f"panel {p['panel']} ({p['fs']:.1f}, {p['ss']:.1f}) "
                                  f"I={p['intensity']:.0f} d={1 / p['one_over_d']:.2f}A"
                                  for p in top)
            print(f"{imageset.get_path(index)} [{index}]: {len(peaks)} peaks, "
                  f"hit={finder.is_hit(peaks)}; strongest: {described or '-'}")
            if args.out:
                tables.append(reflection_table(peaks, boxes, z=frame_number(imageset, index),
                                              experiment_id=experiment_id))
    if args.out:
        from dials.array_family import flex

        merged = flex.reflection_table()
        for table in tables:
            merged.extend(table)
        merged.as_file(args.out)
        print(f"wrote {merged.size()} strong spots to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
