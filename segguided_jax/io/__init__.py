"""Storage (local folders and gs:// buckets behind one interface, NIfTI files included) and the run log."""
