"""psana (LCLS) frame source for peaknet-xtal (import name ``peaknet_psana``)."""
