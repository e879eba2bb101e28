"""Training: configs, arguments, data, optimizer, schedule, checkpoints, logging, the loop."""
