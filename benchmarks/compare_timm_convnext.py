"""Does timm's ConvNeXt-V2 match the project's backbone (model/layers/convnext.py) exactly?

    pip install timm   # not a dependency of the package; only this comparison needs it
    python benchmarks/compare_timm_convnext.py [--sizes atto femto ...] [--no-torchvision]

For every published size: parameters of timm's ``convnextv2_<size>`` (one input channel,
``features_only``) against the project's ``ConvNeXtV2Backbone`` without its per-stage output
norms (timm has no such norms), counted on the ``meta`` device so the huge size costs no memory;
then, for the sizes small enough to run here, the project's weights are copied into timm's model
(1x1 convolutions <- linear layers) and the four stage outputs compared on the same random input.

timm imports torchvision at import time (for its data pipeline).  Where torchvision's wheel does
not load against the installed torch (PyPI's torchvision 0.28 against the project's CPU torch 2.13:
"operator torchvision::nms does not exist"), ``--no-torchvision`` answers every ``torchvision.*``
import with placeholders; timm's ConvNeXt layers use none of it.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import types

import torch

SMALL = ("atto", "femto", "pico", "nano")


class _NoTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Every ``torchvision.*`` module is empty; any name in it is a placeholder class."""

    class _Module(types.ModuleType):
        def __getattr__(self, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return _placeholder()

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = self._Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _placeholder() -> type:
    class Meta(type(torch.nn.Module)):  # type: ignore[misc]
        def __getattr__(cls, name: str) -> str:
            if name.startswith("__"):
                raise AttributeError(name)
            return name  # enum-like members (InterpolationMode.NEAREST)

    class Placeholder(torch.nn.Module, metaclass=Meta):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("torchvision is not available (--no-torchvision)")

    return Placeholder


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def project_backbone(size: str, device: str = "cpu") -> torch.nn.Module:
    from peaknet_xtal.model.layers import ConvNeXtV2Backbone
    from peaknet_xtal.model.peaknet import BACKBONES

    dims, depths = BACKBONES[size]
    with torch.device(device):
        return ConvNeXtV2Backbone(dims, depths, in_chans=1)


def timm_backbone(size: str, device: str = "cpu") -> torch.nn.Module:
    import timm

    with torch.device(device):
        return timm.create_model(f"convnextv2_{size}", pretrained=False, in_chans=1,
                                 features_only=True)


def copy_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Our state dict into timm's names and shapes (Linear (o, i) -> Conv2d 1x1 (o, i, 1, 1))."""
    src = ours.state_dict()
    dst = theirs.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name, value in src.items():
        if name.startswith("out_norms"):
            continue
        new = name.replace("stem.", "stem_").replace("stages.", "stages_")
        if new.startswith("downsamples."):
            i = int(new.split(".")[1]) + 1
            new = f"stages_{i}.downsample." + ".".join(new.split(".")[2:])
        else:
            parts = new.split(".")
            if parts[0].startswith("stages_"):
                new = f"{parts[0]}.blocks.{parts[1]}." + ".".join(parts[2:])
        new = (new.replace("dwconv", "conv_dw").replace("pwconv1", "mlp.fc1")
               .replace("pwconv2", "mlp.fc2").replace("grn.gamma", "mlp.grn.weight")
               .replace("grn.beta", "mlp.grn.bias"))
        if new not in dst:
            raise KeyError(f"{name} -> {new}: not in timm's model")
        mapped[new] = value.reshape(dst[new].shape)
    missing = set(dst) - set(mapped)
    if missing:
        raise KeyError(f"timm parameters with no counterpart: {sorted(missing)[:5]}")
    theirs.load_state_dict(mapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+",
                        default=["atto", "femto", "pico", "nano", "tiny", "base", "large",
                                 "huge"])
    parser.add_argument("--no-torchvision", action="store_true",
                        help="answer timm's torchvision imports with placeholders")
    args = parser.parse_args()
    if args.no_torchvision:
        sys.meta_path.insert(0, _NoTorchvision())
    import timm

    print(f"timm {timm.__version__}, torch {torch.__version__}")
    torch.manual_seed(0)
    print(f"{'size':6s} {'project':>12s} {'timm':>12s}  outputs (max |diff| / max |value|)")
    for size in args.sizes:
        ours_meta = project_backbone(size, "meta")
        n_ours = _count(ours_meta) - _count(ours_meta.out_norms)
        n_timm = _count(timm_backbone(size, "meta"))
        line = f"{size:6s} {n_ours:12,d} {n_timm:12,d}"
        if size in SMALL:
            ours, theirs = project_backbone(size).eval(), timm_backbone(size).eval()
            for p in ours.parameters():  # GRN starts as the identity: make it do something
                torch.nn.init.normal_(p, std=0.05)
            copy_weights(ours, theirs)
            x = torch.randn(1, 1, 128, 160)
            with torch.no_grad():
                feats, ref = ours(x), theirs(x)
                diffs = []
                for i, (a, b) in enumerate(zip(feats, ref, strict=True)):
                    b = ours.out_norms[i](b)  # ours returns normed stage outputs
                    diffs.append(float((a - b).abs().max() / a.abs().max()))
            line += "  " + " ".join(f"{d:.1e}" for d in diffs)
        print(line)


if __name__ == "__main__":
    main()
