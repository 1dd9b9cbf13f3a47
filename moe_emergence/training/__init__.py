"""Training: typed run config, the accelerate loop, optimizer groups, schedules and checkpoints."""
