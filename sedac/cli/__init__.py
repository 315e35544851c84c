"""Command-line entry points: sedac-build and sedac-run."""
