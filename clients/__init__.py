"""tritarget.clients."""
