"""tritarget.service."""
