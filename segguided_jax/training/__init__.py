"""The train step, its loss and optimiser, checkpoints, the workdir lease, the watchdog and the loop."""
