"""Measure: every case of the bad-input corpus through every command, as a user runs them.

    python tests/cli/bad_input_table.py WORKDIR [--no-dials]

Each (command, case) runs as a real subprocess and is classified from its exit status and output:
``clean error`` (non-zero, no traceback, the file named), ``traceback`` (non-zero with a Python
traceback or DIALS' "report this error"), ``silently wrong`` (exit 0 on input that must fail, or
masked pixels without a word), ``works`` (exit 0 on input that is usable, with the warning the
corpus expects).  Prints a Markdown table per command and writes WORKDIR/table.json.  Not a test
(minutes of subprocesses); the tests in this folder check the same outcomes in-process.
"""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]




def run(argv: list[str], cwd: Path) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return proc.returncode, proc.stdout + proc.stderr


def classify(rc: int, output: str, case, warn_words: tuple[str, ...]) -> str:
    if rc == 0 and "Unable to handle the following arguments" in output and case.name in output:
        return "clean error"  # dials.import refuses the file by name (its exit status is 0)
    if rc != 0:
        if "Traceback" in output or "dials-support" in output:
            return "traceback"
        return "clean error" if case.name in output else "unclear error"
    if case.expect == "error":
        return "silently wrong"
    lowered = output.lower()
    return "works" if any(w in lowered for w in warn_words) else "silently wrong"


def main(argv: list[str]) -> int:
    work = Path(argv[0]).resolve()
    with_dials = "--no-dials" not in argv
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "tests" / "labelling")]
    import peaknet_bad_inputs as badinputs
    import simdata
    base, cases = badinputs.build_corpus(work / "corpus", simdata.geometry_text)
    py = sys.executable
    bindir = Path(py).parent
    warn_words = ("warning", "masked", "offset", "no usable pixel")
    rows: list[dict[str, str]] = []

    def record(command: str, case, rc: int, output: str) -> None:
        outcome = classify(rc, output, case, warn_words)
        if command == "peaknet-show" and rc == 0 and (case.expect == "warn"
                                                      or case.name == "zero_frames"):
            outcome = "works"  # a report: value range over finite pixels, counts, 0 frames
        line = next((x for x in output.splitlines() if case.name in x and
                     ("error" in x.lower() or "sorry" in x.lower() or "warn" in x.lower()
                      or "masked" in x.lower())), output.strip().splitlines()[-1:] or [""])
        rows.append({"command": command, "case": case.name, "kind": case.kind,
                     "expect": case.expect, "outcome": outcome,
                     "line": (line if isinstance(line, str) else line[0])[:300]})
        print(f"{command:14s} {case.name:32s} {outcome:14s} {rows[-1]['line'][:120]}",
              flush=True)

    def p2c(args: list[str], case, out: Path) -> None:
        rc, output = run([py, "-m", "peaknet_xtal.cli.peaknet2cxi", *args, "-o", str(out),
                          "--threads", "1", "--no-progress"], work)
        record("peaknet2cxi", case, rc, output)

    def show(args: list[str], case) -> None:
        rc, output = run([py, "-m", "peaknet_xtal.cli.show", *args], work)
        record("peaknet-show", case, rc, output)

    for i, case in enumerate(cases):
        out = work / "out" / f"{i:03d}_{case.name}"
        if case.kind == "image":
            p2c([str(case.path), "-g", str(case.geometry)], case, out)
            show([str(case.path), "-g", str(case.geometry)], case)
        elif case.kind == "geometry":
            p2c([str(case.path.parent / "data.cxi"), "-g", str(case.path)], case, out)
            show([str(case.path)], case)
        elif case.kind == "model":
            p2c([str(base.cxi), "-g", str(base.geom), "--model", str(case.path)], case, out)
        elif case.kind == "stream":
            show([str(case.path)], case)
            rc, output = run([py, "-m", "peaknet_xtal.cli.stream2labels", str(case.path), "-o",
                              str(out / "labels.h5"), "--no-ray", "--quiet"], work)
            record("stream2labels", case, rc, output)

    # a pickled .refl that would run code, beside a genuine .expt
    real = ROOT.parent / "shared" / "data" / "real" / "dials_stills_results_cxi78513"
    if real.is_dir():
        folder = work / "corpus" / "refl" / "pickled_refl"
        folder.mkdir(parents=True)
        shutil.copy(real / "stills.expt", folder / "stills.expt")
        marker = folder / "MARKER"
        (folder / "pickled_refl.refl").write_bytes(pickle.dumps(badinputs._Marker(marker)))
        case = badinputs.Case("pickled_refl", "refl", folder / "pickled_refl.refl", "error",
                              "msgpack")
        rc, output = run([py, "-m", "peaknet_xtal.cli.stream2labels",
                          str(folder / "stills.expt"), str(case.path), "-o",
                          str(work / "out" / "refl" / "labels.h5"), "--no-ray", "--quiet"], work)
        record("stream2labels", case, rc + (100 if marker.exists() else 0), output +
               ("\ncode ran" if marker.exists() else ""))

    if with_dials:
        dials_import, find_spots = str(bindir / "dials.import"), str(bindir / "dials.find_spots")
        clean = work / "dials_clean"
        clean.mkdir()
        rc, output = run([dials_import, str(base.cxi)], clean)
        assert rc == 0, output[-2000:]
        for case in cases:
            folder = work / "dials" / case.name
            folder.mkdir(parents=True)
            if case.kind == "model":
                rc, output = run([find_spots, str(clean / "imported.expt"), "algorithm=peaknet",
                                  f"spotfinder.threshold.peaknet.model={case.path}",
                                  "spotfinder.threshold.peaknet.threads=1"], folder)
                record("dials", case, rc, output)
                continue
            if case.kind not in ("image", "geometry"):
                continue
            rc, output = run([dials_import, str(case.path.parent / "data.cxi")], folder)
            if rc == 0:
                rc, more = run([find_spots, "imported.expt", "algorithm=peaknet",
                                "spotfinder.threshold.peaknet.threads=1"], folder)
                output += more
            record("dials", case, rc, output)

    (work / "table.json").write_text(json.dumps(rows, indent=1))
    outcomes = ["clean error", "traceback", "silently wrong", "works", "unclear error"]
    print("\n| command | " + " | ".join(outcomes) + " |")
    print("|---|" + "---|" * len(outcomes))
    for command in dict.fromkeys(r["command"] for r in rows):
        counts = Counter(r["outcome"] for r in rows if r["command"] == command)
        print(f"| `{command}` | " + " | ".join(str(counts.get(o, 0)) for o in outcomes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
