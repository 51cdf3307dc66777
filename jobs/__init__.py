"""Entry points: one module per stage, each with main(argv), plus the `dalle2` CLI."""
