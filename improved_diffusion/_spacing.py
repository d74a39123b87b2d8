"""``space_timesteps``: which original steps a respaced process keeps (pure Python, no torch).

Kept separate from :mod:`improved_diffusion.respace` (which re-exports it) so that config
validation can check a respacing string without importing torch.

Provenance: API of ``space_timesteps`` in ``improved_diffusion/respace.py`` of
``openai/improved-diffusion@1bc7bbb`` (MIT, Copyright (c) 2021 OpenAI; see
``improved_diffusion/LICENSE``). Written anew. Local changes: honest ``ValueError`` messages
(the failing ``"ddimN"`` names N and the nearest achievable counts); ``"ddim1"`` is accepted
(stride T, upstream refused it); new ``"trailingN"`` spacing (Lin et al. 2023, arXiv:2305.08891,
Table 2), which always starts at ``t = T - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["space_timesteps", "trailing_timesteps"]


def _ddim_counts(num_timesteps: int) -> list[int]:
    """Step counts reachable with ``range(0, T, stride)`` for ``stride = 1 .. T``."""
    return sorted({len(range(0, num_timesteps, s)) for s in range(1, num_timesteps + 1)})


def _count_after(prefix: str, spec: str, given: str, alternatives: str = "") -> int:
    """``N`` of a ``"<prefix>N"`` respacing ``spec`` (``given`` as the user wrote it, for the message).

    Raises:
        ValueError: what follows the prefix is not an integer.
    """
    try:
        return int(spec[len(prefix):])
    except ValueError:
        raise ValueError(
            f"bad respacing {given!r}: expected '{prefix}N' with an integer N{alternatives}"
        ) from None


def trailing_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` steps ending at ``T - 1``: ``round(T - j * T / count) - 1`` for ``j = 0 .. count - 1``.

    The "trailing" spacing of Lin et al. 2023 (arXiv:2305.08891, Sec. 3.3 and Table 2), written as
    ``round(flip(arange(T, 0, -T / count))) - 1``: T=1000, count=10 gives 999, 899, ..., 99, and
    count=1 gives 999 (one step from pure noise). Rounding is Python's ``round`` (half to even, as
    ``numpy.round`` in the paper's formula).

    Raises:
        ValueError: ``count`` outside ``[1, T]``.
    """
    T = int(num_timesteps)
    if not 1 <= count <= T:
        raise ValueError(f"bad respacing 'trailing{count}': need 1 <= N <= {T} (the number of diffusion steps)")
    return sorted({round(T - j * T / count) - 1 for j in range(count)})


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Which original steps to keep when respacing a ``num_timesteps``-step process.

    * ``"ddimN"``: ``range(0, T, stride)`` for the smallest integer stride giving exactly N steps
      (the DDIM paper's uniform spacing, "leading": the last step ``T - 1`` is usually not
      visited; ``"ddim1"`` keeps only ``t = 0``).
    * ``"trailingN"``: N steps ending at ``T - 1`` (:func:`trailing_timesteps`; Lin et al. 2023),
      the spacing to use for few steps: ``"trailing1"`` is a single step from ``t = T - 1``.
    * ``"N"`` or ``"a,b,c"`` (or a list of ints): split ``[0, T)`` into as many equal sections as
      counts (the first ``T % len`` sections one step longer) and take each section's count with a
      fractional stride, rounded, keeping both ends of the section. ``"10"`` at T=1000 gives
      0, 111, 222, ..., 999.

    Args:
        num_timesteps: original number of steps ``T``.
        section_counts: the spacing specification.

    Returns:
        The set of kept original indices.

    Raises:
        ValueError: malformed specification, a count larger than its section, or a ``"ddimN"``
            that no integer stride produces (the message names N and the nearest valid counts).
    """
    T = int(num_timesteps)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("trailing"):
            return set(trailing_timesteps(T, _count_after("trailing", spec, section_counts)))
        if spec.startswith("ddim"):
            desired = _count_after(
                "ddim", spec, section_counts, ", 'trailingN', 'N', or comma-separated counts like '10,15,20'"
            )
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == desired:
                    return set(range(0, T, stride))
            counts = _ddim_counts(T)
            lower = [c for c in counts if c < desired]
            higher = [c for c in counts if c > desired]
            near = ", ".join(f"ddim{c}" for c in ([lower[-1]] if lower else []) + ([higher[0]] if higher else []))
            raise ValueError(
                f"cannot make exactly {desired} DDIM steps ('ddim{desired}') from {T} diffusion steps "
                f"with an integer stride; nearest achievable: {near or 'none'}; or use '{desired}' "
                f"for {desired} evenly spaced steps (fractional stride)"
            )
        try:
            counts_list = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected 'ddimN', 'N', or comma-separated "
                "counts like '10,15,20'"
            ) from None
    else:
        counts_list = [int(x) for x in section_counts]
    if not counts_list or any(c < 1 for c in counts_list):
        raise ValueError(f"bad respacing {section_counts!r}: every section count must be a positive integer")

    n_sections = len(counts_list)
    size_per, extra = divmod(T, n_sections)
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts_list):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"bad respacing {section_counts!r}: cannot take {count} steps from a section of {size} "
                f"(T={T} split into {n_sections} sections)"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)
