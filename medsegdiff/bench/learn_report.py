"""The learning benchmark's readable outputs: the text table and the two PNG plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.baselines.references import reference_label
from medsegdiff.utils.plotting import new_figure, save_png

TABLE_METRICS = (("lesion_f1", "Lesion F1", "{:.3f}"), ("avd_ml", "AVD mL", "{:.1f}"))


def _ci_text(stats: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = stats["ci95"]
    return f"{fmt.format(stats['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def format_table(report: Mapping[str, Any]) -> str:
    """The readable table: one row per method and reference."""
    refs = list(report["settings"]["references"])
    header = ["method", "Dice [95% CI]", *(f"vs {r} [95% CI]" for r in refs), *(t for _, t, _ in TABLE_METRICS),
              "train s", "sample s"]
    body = []
    for group in ("methods", "references"):
        for name, entry in report[group].items():
            m = entry["metrics"]
            label = name if group == "methods" else f"{name} ({reference_label(name)})"
            cells = [label, _ci_text(m.get("dice"))]
            cells += [_ci_text(entry["paired"].get(r), signed=True) if r != name else "-" for r in refs]
            for key, _, fmt in TABLE_METRICS:
                v = (m.get(key) or {}).get("mean")
                cells.append(fmt.format(v) if v is not None else "-")
            for key in ("train_seconds", "sample_seconds"):
                cells.append(f"{entry[key]['mean']:.0f}" if key in entry else "-")
            body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    s = report["settings"]
    n = next(iter(report["methods"].values()))["metrics"]["dice"]["n"] if report["methods"] else 0
    title = (f"bench learn: {len(s['seeds'])} data seeds x {s['test_cases']} test cases ({n} case scores), "
             f"{s['steps']} steps per method; mean test Dice with a 95 % bootstrap CI (cases within seeds); "
             "'vs X' = paired difference to X on the same cases; times = mean per seed")
    return "\n".join([title, line(header), "-" * len(line(header)), *(line(r) for r in body)])


def write_plots(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """``dice_vs_steps.png`` and ``paired_differences.png`` (matplotlib via :mod:`medsegdiff.utils.plotting`)."""
    paths = []
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for name, entry in report["methods"].items():
        curves = [np.array(h) for h in entry["history"].values() if h]
        if not curves:
            continue
        steps = sorted({float(s) for c in curves for s in c[:, 0]})
        mean = [np.mean([c[c[:, 0] == s, 1].mean() for c in curves if (c[:, 0] == s).any()]) for s in steps]
        ax.plot(steps, mean, marker="o", label=name)
    for name, entry in report["references"].items():
        d = entry["metrics"].get("dice", {}).get("mean")
        if d is not None:
            ax.axhline(d, linestyle="--", linewidth=1, color="grey")
            ax.annotate(f"{name} (test)", (0, d), fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("validation Dice (mean over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Dice vs training steps")
    fig.tight_layout()
    paths.append(save_png(fig, out_dir / "dice_vs_steps.png"))

    pairs = [(f"{name} - {ref}", st) for group in ("methods", "references") for name, e in report[group].items()
             for ref, st in e["paired"].items() if st.get("mean") is not None]
    fig = new_figure(6, 0.4 * len(pairs) + 1.2)
    ax = fig.add_subplot()
    for i, (_, st) in enumerate(pairs):
        lo, hi = st["ci95"]
        ax.errorbar(st["mean"], i, xerr=[[st["mean"] - lo], [hi - st["mean"]]], fmt="o", capsize=3)
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(range(len(pairs)), [p[0] for p in pairs], fontsize=7)
    ax.set_xlabel("paired test Dice difference (95 % CI)")
    fig.tight_layout()
    paths.append(save_png(fig, out_dir / "paired_differences.png"))
    return paths


__all__ = ["format_table", "write_plots"]
