"""The stages of an experiment, one typed function each (above ``training``/``inference``, below ``pipeline``).

``prepare.prepare`` (cache + split), ``train.train``, ``calibrate.calibrate``, ``predict.predict``,
``baseline.baseline`` and ``evaluate.evaluate``. ``medsegdiff run`` calls them in this order; the
stand-alone commands (``medsegdiff train`` ...) call the same functions.
"""
