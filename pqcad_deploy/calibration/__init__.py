"""Data-free calibration sets drawn from the FP model's own sampling trajectories."""
