"""Rebuild the shipped default integrator (peaknet_xtal/model/weights/integrator_default.*).

Simulates frames with varied conditions (peaknet_xtal.integration.simdata), cuts a shoebox at
every predicted reflection and trains the variational integrator by maximising the ELBO (no truth
is used).  A few minutes on two CPU cores; ``--device cuda`` runs the same code on a GPU.

    python examples/train_integrator_default.py [--frames 60] [--steps 2000] [--out PATH]

The shipped weights were made by the defaults (60 frames, 2000 steps: 10 minutes on one core of
a shared 2-core machine); ``--init`` continues training from other weights.
"""
from __future__ import annotations

import argparse
import logging
import time

from peaknet_xtal.integration.simdata import simulate_shoeboxes
from peaknet_xtal.integration.train import train
from peaknet_xtal.integration.weights import default_path, save_integrator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(default_path()))
    parser.add_argument("--init", help="continue from these weights (new parameters start at "
                                       "their defaults)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import torch

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    boxes = simulate_shoeboxes(args.frames, args.seed)
    model = None
    if args.init:
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        from peaknet_xtal.integration.model import build_model

        config = json.loads(Path(args.init).with_suffix(".json").read_text())
        config.pop("extra", None)
        model = build_model(config)
        model.load_state_dict(load_file(args.init), strict=False)
    model, history = train(boxes, steps=args.steps, seed=args.seed, device=args.device,
                           model=model)
    extra = {"trained_on": f"{len(boxes)} simulated shoeboxes from {args.frames} frames "
                           f"(seed {args.seed})", "steps": args.steps,
             "final_loss": history[-1], "script": "examples/train_integrator_default.py",
             "init": args.init,
             "seconds": round(time.perf_counter() - start)}
    print(save_integrator(model, args.out, extra=extra), extra)


if __name__ == "__main__":
    main()
