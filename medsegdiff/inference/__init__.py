"""Inference: batched ensemble sampling, ensemble combination, calibration, export, predict."""
