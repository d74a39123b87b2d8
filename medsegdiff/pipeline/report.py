"""What ``medsegdiff run`` shows at the end: the comparison table, tracker tables, where the outputs are."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medsegdiff.baselines.references import reference_label
from medsegdiff.stages.layout import RunDir
from medsegdiff.tracking import wandb_location

# Summary keys shown in the final table: (key in the evaluation summary, column title, format)
TABLE_COLUMNS = (
    ("dice", "Dice", "{:.3f}"),
    ("avd_ml", "AVD (mL)", "{:.2f}"),
    ("lesion_f1", "Lesion F1", "{:.3f}"),
    ("lesion_count_diff", "Count diff", "{:.2f}"),
)


def format_table(results: Mapping[str, Any]) -> str:
    """A short text table: one row per method, the ISLES24 metrics as columns."""
    rows = [("MedSegDiff (this run)", results.get("model", {})),
            ("Tmax > 9 s baseline", results.get("baseline_tmax", {}))]
    rows += [(reference_label(name), summ) for name, summ in results.get("references", {}).items()]
    header = ["method"] + [title for _, title, _ in TABLE_COLUMNS]
    body = []
    for label, summ in rows:
        cells = [label]
        for key, _, fmt in TABLE_COLUMNS:
            v = summ.get(key)
            cells.append(fmt.format(v) if isinstance(v, (int, float)) else "-")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    sep = "-" * len(line(header))
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def log_results(tracker: Any, results: Mapping[str, Any], step: int) -> None:
    """Test metrics of the model and the baseline, and the summary/per-case tables, to the tracker."""
    metrics = {f"test/{k}": v for k, v in results.get("model", {}).items()}
    metrics.update({f"baseline_tmax/{k}": v for k, v in results.get("baseline_tmax", {}).items()})
    tracker.log(metrics, step=step)
    columns = ["method"] + [k for k, _, _ in TABLE_COLUMNS]
    rows = [[name] + [results.get(key, {}).get(k) for k, _, _ in TABLE_COLUMNS]
            for name, key in (("medsegdiff", "model"), ("tmax_baseline", "baseline_tmax"))]
    tracker.log_table("test/summary", columns, rows, step=step)
    per_case = results.get("per_case", {}).get("model") or []
    if per_case:
        keys = ["case_id", *(k for k, _, _ in TABLE_COLUMNS)]
        tracker.log_table("test/cases", keys, [[r.get(k) for k in keys] for r in per_case], step=step)


def print_locations(rd: RunDir, tracker: Any) -> None:
    """The run directory, overlays, metrics, results and the W&B run, one line each."""
    print(f"\nrun directory : {rd.root}", flush=True)
    overlays = sorted(rd.predictions.rglob("*.png"))
    if overlays:
        print(f"overlays      : {overlays[0].parent}  ({len(overlays)} PNG)")
    print(f"metrics       : {rd.metrics}")
    print(f"results       : {rd.results}")
    wb = wandb_location(tracker)
    if wb is not None:
        mode, where = wb
        if mode == "offline":
            print(f"W&B (offline) : {where}\n                upload later with: wandb sync {where}")
        elif where:
            print(f"W&B ({mode})  : {where}")
