"""PeakNet segmentation models: ``create_model``, ``list_models``, ``load_model``, ``save_model``.

``load_model("default")`` returns the small model shipped in ``peaknet_xtal/model/weights``.
"""
from __future__ import annotations

from peaknet_xtal.model.weights_io import load_model, read_config, save_model
from peaknet_xtal.model.zoo import build_from_config, create_model, list_models, model_config

__all__ = ["build_from_config", "create_model", "list_models", "load_model", "model_config",
           "read_config", "save_model"]
