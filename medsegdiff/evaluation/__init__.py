"""Evaluation of prediction folders against ISLES'24 references (``medsegdiff evaluate``)."""
