"""tritarget.protos."""
