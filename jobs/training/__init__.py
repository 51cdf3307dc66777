"""Training on Ray Train: configs, the driver (fit), the worker, the loop and its cadence, curves."""
