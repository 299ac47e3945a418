"""The round loop: run directory, stage state and the driver."""
