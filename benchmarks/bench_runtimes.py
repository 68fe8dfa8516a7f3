"""An inference runtime from PyPI against the engine's own CPU form of the default network.

    pip install openvino        # not a dependency of the package: this script only
    python benchmarks/bench_runtimes.py [--model default] [--repeat 3]

Issue 17 asks to measure an inference runtime available from PyPI and keep it if it pays.  This
runs the default network (backbone, BiFPN, head; the input already normalised) on two inputs the
engine hands it, eight CSPAD tiles (8 x 192 x 224) and a whole Pilatus 6M panel (2528 x 2464):
as trained (plain), in the engine's fused CPU form (``model.fast``: the baseline, measured in
the same run) and through OpenVINO (the plain network traced and converted, fp32, one inference
thread).  Printed per input: the conversion time, the CPU seconds of each (best of ``--repeat``),
OpenVINO's time over the fused form's, and each output's largest difference from the plain
network's.  One torch thread, CPU clock.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import cpu_best  # noqa: E402 - the benchmarks' one CPU-clock timer

#: (name, network input shape) for the engine's two typical calls
INPUTS = (("CSPAD, 8 tiles", (8, 1, 192, 224)), ("Pilatus 6M, whole panel", (1, 1, 2528, 2464)))


def measure(name: str, z: Any, plain: Any, fused: Any, core: Any, repeat: int) -> str:
    """One input's line: OpenVINO's conversion time, then plain, fused and OpenVINO CPU seconds
    and each output's largest difference from the plain network's."""
    import numpy as np
    import openvino as ov
    import torch

    start = time.perf_counter()
    # the network's checks branch on shapes only; the tracer's own re-check compares two
    # traces' constants and fails on the head's shape arithmetic, so it is left off
    traced = torch.jit.trace(plain, z, check_trace=False)
    compiled = core.compile_model(ov.convert_model(traced, example_input=z), "CPU",
                                  {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    prepared = time.perf_counter() - start
    with torch.no_grad():
        reference, ours = plain(z), fused(z)
        t_plain = cpu_best(lambda: plain(z), repeat)
        t_fused = cpu_best(lambda: fused(z), repeat)
    theirs = compiled(z.numpy())[0]
    t_ov = cpu_best(lambda: compiled(z.numpy()), repeat)
    return (f"{name}: conversion {prepared:.1f} s; plain {t_plain:.3f} s, fused (baseline) "
            f"{t_fused:.3f} s, OpenVINO {t_ov:.3f} s = {t_ov / t_fused:.2f} x the fused form; "
            f"largest difference from plain: fused {(ours - reference).abs().max():.1e}, "
            f"OpenVINO {np.abs(theirs - reference.numpy()).max():.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a model name or weights file")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        import openvino as ov
    except ImportError:
        print("bench_runtimes: needs OpenVINO (pip install openvino); not installed",
              file=sys.stderr)
        return 2
    import torch

    from peaknet_xtal.model.fast import fuse_for_inference
    from peaknet_xtal.model.weights_io import load_model

    torch.set_num_threads(1)

    class Network(torch.nn.Module):
        """The network after the input normalisation: the peak-minus-background logit."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            m = self.model
            return m.head(m.neck(m.backbone(z)), (z.shape[-2], z.shape[-1]), difference=True)

    model = load_model(args.model).eval()
    plain, fused = Network(model).eval(), Network(fuse_for_inference(model)).eval()
    core = ov.Core()
    print(f"OpenVINO {ov.__version__}, torch {torch.__version__}, one thread, CPU seconds, "
          f"best of {args.repeat}")
    for name, shape in INPUTS:
        print(measure(name, torch.randn(shape, generator=torch.Generator().manual_seed(0)),
                      plain, fused, core, args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
