"""Experiments: run directories, the one-command ``run`` pipeline and sweeps."""
