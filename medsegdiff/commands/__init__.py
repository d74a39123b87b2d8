"""CLI sub-commands; see :mod:`medsegdiff.cli` for the contract."""
