"""DIALS adapters for peaknet-xtal (import name ``peaknet_dials``)."""
