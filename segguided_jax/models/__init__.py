"""The network and its building blocks."""
from segguided_jax.models.network import SegGuidedNet, build_model, gate_parameter_count, parameter_count

__all__ = ["SegGuidedNet", "build_model", "gate_parameter_count", "parameter_count"]
