"""dxtbx format for peaknet-xtal CXI stacks (import name ``peaknet_dxtbx``)."""
