"""Networks: MedSegDiff-V1/V2 conditional diffusion UNets and the DynUNet baseline.

Use :func:`medsegdiff.nets.registry.build_model`. Importing this package imports nothing heavy
beyond torch.
"""

from __future__ import annotations

__all__: list[str] = []
