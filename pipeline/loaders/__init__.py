"""The streaming loaders that feed training: the plan of what each rank reads (plan.py), and its batches (batches.py)."""
