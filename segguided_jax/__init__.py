"""SegGuidedNet in JAX/Flax: 3D brain-tumour segmentation whose decoder explains itself."""
from segguided_jax import runtime as _runtime

# First, before any submodule can start JAX's backend: XLA reads its flags only then.
_runtime.apply()
