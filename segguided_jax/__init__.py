"""SegGuidedNet in JAX/Flax: 3D brain-tumour segmentation whose decoder explains itself."""
