"""ISLES24 data: synthetic look-alike, case discovery, loading/checking, preprocessing cache, datasets.

Submodules are imported explicitly (``from medsegdiff.data.loading import load_case``); importing
this package has no side effects and pulls in no heavy library.
"""

from __future__ import annotations
