"""Seed sweeps and ablations over training runs."""
