"""Data preparation: BraTS-layout folders -> ArrayRecord shards, and a synthetic BraTS-like set."""
