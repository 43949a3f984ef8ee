"""Training Meta-TasNet: data sampling, optimiser, the loop, and Ray Train distribution."""
