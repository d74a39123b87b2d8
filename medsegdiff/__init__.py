"""medsegdiff: diffusion segmentation of ischemic stroke lesions in ISLES24 multimodal CT.

Importing this package has no side effects (no tracking, no process groups, no directories).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
