"""Building blocks of the PeakNet models: ConvNeXt-V2, BiFPN, segmentation head, input handling."""
from __future__ import annotations

from .bifpn import BiFPN, BiFPNBlock, fast_normalised_fusion
from .convnext import GRN, ConvNeXtV2Backbone, ConvNeXtV2Block, LayerNorm2d
from .head import SegHead
from .standardise import standardise

__all__ = ["BiFPN", "BiFPNBlock", "ConvNeXtV2Backbone", "ConvNeXtV2Block", "GRN", "LayerNorm2d",
           "SegHead", "fast_normalised_fusion", "standardise"]
