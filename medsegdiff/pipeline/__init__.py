"""The pipeline: run directories, the one-command ``run`` of every stage, sweeps (above ``stages``)."""
