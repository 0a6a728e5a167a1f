"""The `merit` command line (typer)."""
