"""Training: trainer, checkpoints, EMA, distributed helpers, validation during training.

Import the submodules directly (``medsegdiff.training.trainer.train``,
``medsegdiff.training.checkpoint.load_for_inference``); importing this package has no side effects.
"""
