"""`dalle2 serve`: a run's model and data index behind an HTTP API and one page, on Ray Serve."""
