"""DALLE2-pytorch and LAION checkpoints in and out: `configs` turns their JSON configs into ours (and back), `weights`
their checkpoints into our models (and back). `dalle2 import` (jobs/import_weights.py) is the command around them."""
