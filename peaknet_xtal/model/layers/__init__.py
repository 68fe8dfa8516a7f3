"""Building blocks of the PeakNet models: ConvNeXt-V2, BiFPN, segmentation head, input handling."""
from __future__ import annotations

from peaknet_xtal.model.layers.bifpn import BiFPN, BiFPNBlock, fast_normalised_fusion
from peaknet_xtal.model.layers.convnext import GRN, ConvNeXtV2Backbone, ConvNeXtV2Block, LayerNorm2d
from peaknet_xtal.model.layers.head import SegHead
from peaknet_xtal.model.layers.standardise import standardise

__all__ = ["BiFPN", "BiFPNBlock", "ConvNeXtV2Backbone", "ConvNeXtV2Block", "GRN", "LayerNorm2d",
           "SegHead", "fast_normalised_fusion", "standardise"]
