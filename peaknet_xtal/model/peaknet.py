"""PeakNet: ConvNeXt-V2 backbone + BiFPN neck + two-pathway head, for Bragg peak segmentation.

Input handling lives inside the model so that no caller can feed it differently from training:
per-image (``layers.standardise``) or per-neighbourhood (``layers.local_norm``) standardisation over
valid pixels, as the model's ``input_norm`` config says (weights saved before the local one existed
have no such key and keep the global one; the local one's noise scale is per pixel unless
``norm_noise`` says ``sum2x2`` or ``decorrelated``), padding to a multiple of
32 (the four resampling levels need it) with padded pixels excluded from the statistics and cropped
off the output, and the bad-pixel mask enforced on the logits so a masked pixel is never a peak.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peaknet_xtal.model.layers import BiFPN, ConvNeXtV2Backbone, SegHead, standardise
from peaknet_xtal.model.layers.local_norm import NOISE_SCALES, finite, local_normalise
from peaknet_xtal.model.layers.valid_stats import statistics_over
from peaknet_xtal.model.zoo import register_family, register_model

#: Published ConvNeXt-V2 sizes: (dims, depths).  Backbone parameters with one input channel and no
#: classifier: atto 3.39M, femto 4.85M, pico 8.55M, nano 14.98M, tiny 27.86M, base 87.69M,
#: large 196.4M, huge 657.5M.  zepto, yocto and swift (three levels) are this package's own
#: CPU sizes.
BACKBONES: dict[str, tuple[list[int], list[int]]] = {
    "swift": ([16, 32, 64], [1, 1, 2]),
    "yocto": ([8, 16, 32, 64], [1, 1, 2, 1]),
    "zepto": ([16, 32, 64, 128], [2, 2, 4, 2]),
    "atto": ([40, 80, 160, 320], [2, 2, 6, 2]),
    "femto": ([48, 96, 192, 384], [2, 2, 6, 2]),
    "pico": ([64, 128, 256, 512], [2, 2, 6, 2]),
    "nano": ([80, 160, 320, 640], [2, 2, 8, 2]),
    "tiny": ([96, 192, 384, 768], [3, 3, 9, 3]),
    "base": ([128, 256, 512, 1024], [3, 3, 27, 3]),
    "large": ([192, 384, 768, 1536], [3, 3, 27, 3]),
    "huge": ([352, 704, 1408, 2816], [3, 3, 27, 3]),
}
PUBLISHED_BACKBONE_PARAMS: dict[str, float] = {
    "atto": 3.39e6, "femto": 4.85e6, "pico": 8.55e6, "nano": 14.98e6, "tiny": 27.86e6,
    "base": 87.69e6, "large": 196.4e6, "huge": 657.5e6,
}
PAD_MULTIPLE = 32
#: Where the GRN and GroupNorm layers take their statistics: from each input image (as trained),
#: ``fixed``, measured once on training data and stored (model/fixed_stats.py), or ``window``,
#: over ``stats_window`` input pixels around each position (layers/window_stats.py), or ``none``:
#: no GRN, and the head normalises each pixel over its channels (LayerNorm) instead of GroupNorm,
#: so every layer is local and the network's reach is its convolutions'
IMAGE_STATS = ("per_image", "fixed", "window", "none")
#: Logits forced onto masked pixels: background wins by 30 nats, finite so losses stay finite.
MASKED_LOGITS = (15.0, -15.0)


class PeakNet(nn.Module):
    """ConvNeXt-V2 backbone, BiFPN neck and segmentation head

    ``model(x, mask=None) -> (B, 2, H, W)`` logits; channel 1 is "peak".  The first line above
    is the family's description where models are listed (``zoo.declared_families``)."""

    #: Input sides are padded to this inside ``forward``; batching callers (the finding engine)
    #: pad tiles to it themselves so that tiles of different sizes share a batch.
    pad_multiple = PAD_MULTIPLE

    def __init__(self, backbone: str | None = None, dims: list[int] | None = None,
                 depths: list[int] | None = None, neck_width: int = 256, neck_blocks: int = 1,
                 neck_kernel: int = 3, head_channels: int = 256, learned_upsample: bool = True,
                 num_classes: int = 2, drop_path: float = 0.0, name: str = "custom",
                 input_norm: str = "global", norm_block: int = 16,
                 norm_noise: str = "pixel", image_stats: str = "per_image",
                 stats_window: int = 96) -> None:
        super().__init__()
        if dims is None or depths is None:
            if backbone not in BACKBONES:
                raise KeyError(f"unknown backbone {backbone!r}; known: {list(BACKBONES)}")
            dims = list(dims if dims is not None else BACKBONES[backbone][0])
            depths = list(depths if depths is not None else BACKBONES[backbone][1])
        if input_norm not in ("global", "local"):
            raise ValueError(f"input_norm must be 'global' or 'local', got {input_norm!r}")
        if norm_noise not in NOISE_SCALES:
            raise ValueError(f"norm_noise must be one of {NOISE_SCALES}, got {norm_noise!r}")
        if image_stats not in IMAGE_STATS:
            raise ValueError(f"image_stats must be one of {IMAGE_STATS}, got {image_stats!r}")
        if image_stats == "window" and stats_window < 1:
            raise ValueError(f"stats_window must be a positive pixel count, got {stats_window}")
        if backbone is not None and BACKBONES.get(backbone) != (list(dims), list(depths)):
            backbone = None  # overridden widths or depths: no longer the named size
        self.config: dict[str, Any] = {
            "family": "peaknet", "name": name, "backbone": backbone, "dims": list(dims),
            "depths": list(depths), "neck_width": neck_width, "neck_blocks": neck_blocks,
            "neck_kernel": neck_kernel, "head_channels": head_channels,
            "learned_upsample": learned_upsample, "num_classes": num_classes,
            "drop_path": drop_path, "input_norm": input_norm, "norm_block": norm_block,
            "norm_noise": norm_noise, "image_stats": image_stats,
        }
        window = 0
        if image_stats == "window":  # only then in the config: older models' configs unchanged
            self.config["stats_window"] = window = int(stats_window)
        fixed = image_stats == "fixed"
        pixel = image_stats == "none"
        self.backbone = ConvNeXtV2Backbone(dims, depths, in_chans=1, drop_path=drop_path,
                                           fixed_stats=fixed, stats_window=window,
                                           grn=not pixel)
        info = self.backbone.feature_info
        self.neck = BiFPN([f["channels"] for f in info], neck_width, neck_blocks, neck_kernel)
        self.head = SegHead(neck_width, [f["stride"] for f in info], head_channels, num_classes,
                            learned_upsample, fixed, window, pixel)
        self.apply(_init_weights)

    def normalise(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The network's input for raw ``x``: global (per image) or local (per neighbourhood,
        ``layers.local_norm``, with its ``norm_noise`` scale: per pixel, at least that of a
        2 x 2 sum, or per pixel over the panel's 2 x 2-sum noise excess) standardisation, as the
        model's config says."""
        if self.config["input_norm"] == "local":
            return local_normalise(x, valid, self.config["norm_block"],
                                   self.config["norm_noise"])
        return standardise(x, valid)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                normalised: bool = False) -> torch.Tensor:
        """Logits for raw ``x`` (or for ``x`` already through :meth:`normalise` with
        ``normalised=True``: the engine normalises whole panels once, before tiling)."""
        z, valid, padded = self._network_input(x, mask, normalised)
        h, w = x.shape[-2:]
        with statistics_over(_stats_valid(valid, padded)):
            logits = self.head(self.neck(self.backbone(z)), padded)[..., :h, :w]
        return apply_mask(logits, valid)

    def peak_logit(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                   normalised: bool = False) -> torch.Tensor:
        """The peak logit minus the background one, ``(B, 1, H, W)``, as :meth:`forward` would
        give it (masked pixels: background); ``sigmoid`` of it is the peak probability.  The
        head computes it as one channel (``SegHead``'s ``difference``): the finding engine's
        path, which never needs the two logits apart.  Measured on the head's last steps (the
        stride-4 logits, bilinear and learned x4 upsampling; 8 CSPAD tiles, fused form, one
        thread): 12 ms a batch with two channels, 3.5 with one."""
        z, valid, padded = self._network_input(x, mask, normalised)
        h, w = x.shape[-2:]
        with statistics_over(_stats_valid(valid, padded)):
            logit = self.head(self.neck(self.backbone(z)), padded,
                              difference=True)[..., :h, :w]
        return apply_mask(logit, valid, difference=True)

    def _network_input(self, x: torch.Tensor, mask: torch.Tensor | None, normalised: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(padded network input, valid pixels, padded size) for ``x`` of shape (B, 1, H, W)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected input of shape (B, 1, H, W), got {tuple(x.shape)}")
        valid = finite(x)
        if mask is not None:
            if mask.shape != x.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != input {tuple(x.shape)}")
            valid = valid & mask.bool()
        h, w = x.shape[-2:]
        z = torch.where(valid, x.float(), 0.0) if normalised else self.normalise(x, valid)
        ph, pw = (-h) % PAD_MULTIPLE, (-w) % PAD_MULTIPLE
        if ph or pw:
            z = F.pad(z, (0, pw, 0, ph))
        return z, valid, (h + ph, w + pw)

    def backbone_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())


def _stats_valid(valid: torch.Tensor, padded: tuple[int, int]) -> torch.Tensor:
    """Where the network's image-wide statistics are taken (layers/valid_stats.py): the valid
    pixels and the padding to the model's multiple, which always counted (so that an image
    without masked pixels gets the statistics it always did).  The padding is this model's own
    and the engine's (which pads its batches itself and marks that padding invalid): rows and
    columns after an image's last valid one, fewer than the multiple (the engine crops each
    panel to its valid region, so only its padding lies there)."""
    h, w = valid.shape[-2:]
    full = F.pad(valid, (0, padded[1] - w, 0, padded[0] - h), value=True)
    rows, cols = (_padding_tail(full.any(axis)) for axis in (-1, -2))
    return full | rows.unsqueeze(-1) | cols.unsqueeze(-2)


def _padding_tail(used: torch.Tensor) -> torch.Tensor:
    """(B, 1, N) bool: the lines after the last used one of each image, if fewer than
    :data:`PAD_MULTIPLE` (``used``: (B, 1, N), whether a line holds a valid pixel)."""
    size = used.shape[-1]
    index = torch.arange(size, device=used.device)
    last = torch.where(used, index, -1).amax(-1, keepdim=True)  # (B, 1, 1)
    return (index > last) & (size - 1 - last < PAD_MULTIPLE)


def apply_mask(logits: torch.Tensor, valid: torch.Tensor, difference: bool = False
               ) -> torch.Tensor:
    """Force background on invalid pixels (``valid`` is (B, 1, H, W) bool).  With
    ``difference``, ``logits`` is the one channel of the peak logit minus the background one
    (:meth:`PeakNet.peak_logit`): a masked pixel takes the difference of the masked logits, as
    it would from the two channels."""
    if difference:
        fill = logits.new_tensor((MASKED_LOGITS[1] - MASKED_LOGITS[0],))
    else:
        fill = logits.new_tensor(masked_logits(logits.shape[1]))
    return torch.where(valid, logits, fill.view(1, -1, 1, 1))


def masked_logits(classes: int) -> tuple[float, ...]:
    """The logits of a masked pixel over ``classes`` channels: background, surely."""
    return MASKED_LOGITS[:1] + (MASKED_LOGITS[1],) * (classes - 1)


def _init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02) for conv/linear weights, zero biases (as ConvNeXt-V2)."""
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
        if module.weight.device.type != "meta":
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


register_family("peaknet", PeakNet)

# ---- registered sizes --------------------------------------------------------------------------
# Backbone sizes with the paper's single-block neck (F=256, C=256) and its two-pathway head (the
# learned x4 upsampling path is what recovers 1-3 pixel peaks) ...
for _size in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"):
    register_model(_size, "peaknet", backbone=_size, neck_width=256, neck_blocks=1,
                   head_channels=256, learned_upsample=True)
# ... the paper's teacher (PeakNet-673M) and distillation students ...
register_model("teacher", "peaknet", backbone="huge", neck_width=512, neck_blocks=4,
               head_channels=256, learned_upsample=True)
for _size in ("tiny", "atto"):
    for _blocks in (2, 4):
        register_model(f"student-{_size}-b{_blocks}", "peaknet", backbone=_size, neck_width=512,
                       neck_blocks=_blocks, head_channels=256, learned_upsample=True)
# ... and this package's CPU sizes, thin everywhere (the neck and head, not the backbone, dominate
# the compute of small PeakNets).
register_model("zepto", "peaknet", backbone="zepto", neck_width=64, neck_blocks=2,
               head_channels=32, learned_upsample=True)
register_model("yocto", "peaknet", backbone="yocto", neck_width=32, neck_blocks=2,
               head_channels=16, learned_upsample=True)
register_model("default", "peaknet", backbone="zepto", neck_width=32, neck_blocks=2,
               head_channels=32, learned_upsample=True)
# ``swift``: a CPU candidate for issue 17 (measured, not installed: less accurate than
# ``default``; weights in benchmarks/candidates/), sized from the per-stage profile of
# ``default`` (one thread, a CSPAD frame: the BiFPN neck 27 %, the backbone 39 %, input
# normalisation 7-15 %, the head's full-resolution logits 9 %).  Three backbone levels, one
# block each but two at stride 16; no BiFPN blocks (the head's per-level branches already fuse
# the levels top-down); a 16-channel head with the same two pathways (bilinear logits + learned
# x4 upsampling), so the engine, the fused CPU form and the threshold calibration treat it as
# every other PeakNet.  Local input normalisation, as issue 14 asks.
register_model("swift", "peaknet", backbone="swift", neck_width=16,
               neck_blocks=0, head_channels=16, learned_upsample=True, input_norm="local")
