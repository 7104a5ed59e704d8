"""Compiling the train and predict steps for CPUs, TPU slices and GPUs without the hardware."""
