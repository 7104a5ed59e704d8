"""Meshes, shardings and what the processes of a multi-process run do together."""
