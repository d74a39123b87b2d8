"""``medsegdiff run``: from data to scored predictions in one command.

Stages, in order (each can be run alone with ``stages=``):

1. ``prepare``  - generate the synthetic dataset if asked (``data.synthetic.generate`` and a missing
   ``data.root``), build or reuse the preprocessed cache, derive and save the subject split;
2. ``train``    - :func:`medsegdiff.training.trainer.train` into the run directory;
3. ``predict``  - predict the held-out (test split) cases with the best checkpoint;
4. ``evaluate`` - score the model AND the official Tmax > 9 s baseline on the same cases, print
   and save the comparison (``results.json``), log it to the tracker.

Under torchrun every rank calls :func:`run_experiment`; rank 0 prepares the data and creates the run
directory, all ranks train, rank 0 predicts and evaluates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medsegdiff.config import ExperimentConfig, save_config, to_dict
from medsegdiff.errors import CheckpointError, ConfigError, DataError
from medsegdiff.experiments.rundir import RunDir, finish_meta, init_shared_run_dir
from medsegdiff.utils.io import atomic_write_json

logger = logging.getLogger("medsegdiff.experiments")

STAGES = ("prepare", "train", "predict", "evaluate")
# Summary keys shown in the final table: (key in the evaluation summary, column title, format)
TABLE_COLUMNS = (
    ("dice", "Dice", "{:.3f}"),
    ("avd_ml", "AVD (mL)", "{:.2f}"),
    ("lesion_f1", "Lesion F1", "{:.3f}"),
    ("lesion_count_diff", "Count diff", "{:.2f}"),
)


@dataclasses.dataclass
class PipelineResult:
    """What :func:`run_experiment` did."""

    run_dir: Path
    stages: list[str]
    results: dict[str, Any] | None = None
    train: Any = None
    cfg: ExperimentConfig | None = None


def parse_stages(text: str | Sequence[str] | None) -> list[str]:
    """``"prepare,train"`` -> ``["prepare", "train"]`` in pipeline order.

    Raises:
        ConfigError: an unknown stage name.
    """
    if text is None:
        return list(STAGES)
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    for s in items:
        if s not in STAGES:
            raise ConfigError(f"--stages: unknown stage '{s}'; allowed: {', '.join(STAGES)} (comma-separated)")
    if not items:
        raise ConfigError(f"--stages: empty; allowed: {', '.join(STAGES)} (comma-separated)")
    return [s for s in STAGES if s in items]


def say(message: str) -> None:
    """A progress line on stdout (rank 0) that also goes to ``logs/run.log``."""
    if _rank() == 0:
        print(message, flush=True)
    logger.info(message)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy ``medsegdiff`` log records into ``path`` (``logs/run.log``) for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("medsegdiff")
    old_level = root.level
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


# --------------------------------------------------------------------------- prepare
def check_data_root(cfg: ExperimentConfig) -> Path:
    """``data.root`` if it exists or will be generated (``data.synthetic.generate``).

    Raises:
        ConfigError: ``data.root`` is empty.
        DataError: ``data.root`` does not exist and ``data.synthetic.generate`` is false.
    """
    if not cfg.data.root:
        raise ConfigError(
            "config key 'data.root' is empty; point it at the extracted ISLES24 release "
            "(e.g. data.root=/data/isles24/train) or use experiments/quickstart.yaml for synthetic data"
        )
    root = Path(cfg.data.root).expanduser()
    if not root.exists() and not cfg.data.synthetic.generate:
        raise DataError(
            f"{root}: data.root does not exist; fix data.root (e.g. data.root=/data/isles24/train), "
            "or set data.synthetic.generate=true to create a synthetic dataset there"
        )
    return root


def ensure_dataset(cfg: ExperimentConfig, *, progress: bool = True) -> Path:
    """The data root, generating the synthetic dataset first when the config asks for it.

    Raises:
        ConfigError: ``data.root`` is empty.
        DataError: ``data.root`` does not exist and ``data.synthetic.generate`` is false.
    """
    root = check_data_root(cfg)
    if root.exists():
        return root
    syn = cfg.data.synthetic
    from medsegdiff.data.synthetic import generate_dataset

    logger.info("generating %d synthetic cases (%s, %s layout) in %s", syn.cases, syn.shape, syn.layout, root)
    say(f"[prepare] generating a synthetic ISLES24-like dataset ({syn.cases} cases) in {root}")
    generate_dataset(root, cases=syn.cases, seed=syn.seed, layout=syn.layout, shape=syn.shape, progress=progress)
    return root


def cache_dir_for(cfg: ExperimentConfig, data_root: Path) -> Path:
    """``data.cache_dir`` or ``<run_root>/cache/<hash of the data root and preprocessing settings>``."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    import hashlib

    try:  # the data part defines which settings determine the cache content
        from medsegdiff.data.preprocess import cache_settings

        settings: dict[str, Any] = cache_settings(cfg.data)
    except ImportError:  # pragma: no cover - data part missing
        settings = to_dict(cfg.data)
    settings = {"settings": settings, "root": str(data_root.resolve())}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(cfg.run_root) / "cache" / digest


def stage_prepare(cfg: ExperimentConfig, rd: RunDir, *, resume: bool, progress: bool = True) -> tuple[Any, Any]:
    """Build/reuse the cache, then fix the split (``splits.json``). Returns (manifest, splits)."""
    from medsegdiff.data.preprocess import prepare_dataset
    from medsegdiff.data.splits import Splits, make_splits

    root = ensure_dataset(cfg, progress=progress)
    cache_dir = cache_dir_for(cfg, root)
    say(f"[prepare] cache {cache_dir}")
    manifest = prepare_dataset(root, cache_dir, cfg.data, workers=cfg.data.prepare_workers, progress=progress)
    if cfg.data.split.file and Path(cfg.data.split.file).resolve() != rd.splits.resolve():
        splits = Splits.load(cfg.data.split.file, manifest.case_ids)
    elif rd.splits.is_file() and resume:
        splits = Splits.load(rd.splits, manifest.case_ids)
    else:
        splits = make_splits(manifest.case_ids, cfg.data.split)
    splits.save(rd.splits)
    say(f"[prepare] {len(manifest.case_ids)} cases: {len(splits.train)} train, {len(splits.val)} val, "
        f"{len(splits.test)} test")
    from medsegdiff.data.preprocess import ceiling_message

    say(f"[prepare] {ceiling_message(manifest.last_run['resolution_ceiling'])}")
    for line in manifest.last_run["warnings"]:
        say(f"[prepare] WARNING: {line}")
    return manifest, splits


def with_data_paths(cfg: ExperimentConfig, cache_dir: Path, splits_file: Path) -> ExperimentConfig:
    """The config the later stages see: the resolved cache folder and the saved split."""
    data = dataclasses.replace(
        cfg.data,
        cache_dir=str(cache_dir),
        split=dataclasses.replace(cfg.data.split, file=str(splits_file)),
    )
    return dataclasses.replace(cfg, data=data)


# --------------------------------------------------------------------------- train / predict
def best_checkpoint(rd: RunDir) -> Path:
    """``checkpoints/best.pt`` if it exists, else the newest ``step_*.pt``.

    Raises:
        CheckpointError: no checkpoint at all.
    """
    best = rd.checkpoints / "best.pt"
    if best.is_file():
        return best
    from medsegdiff.training.checkpoint import find_latest

    latest = find_latest(rd.root)
    if latest is None:
        raise CheckpointError(f"{rd.checkpoints}: no checkpoint; run the train stage first (--stages train)")
    return Path(latest)


def stage_train(cfg: ExperimentConfig, rd: RunDir, *, resume: bool, tracker: Any, progress: bool = True) -> Any:
    from medsegdiff.training.checkpoint import find_latest
    from medsegdiff.training.trainer import train

    has_ckpt = find_latest(rd.root) is not None
    if resume and not has_ckpt:
        logger.info("no checkpoint in %s yet: training from the start", rd.root)
    say(f"[train] {cfg.model.name} ({cfg.model.preset or 'custom'}) for {cfg.train.steps} steps"
        + (f" or {cfg.train.time_budget_s:.0f} s" if cfg.train.time_budget_s else ""))
    from medsegdiff.tracking.progress import ProgressTracker

    bar = ProgressTracker(tracker, cfg.train.steps, enabled=progress and tracker is not None)
    try:
        return train(cfg, rd.root, resume=resume and has_ckpt, tracker=bar if tracker is not None else None)
    finally:
        bar.close()


def test_cases(rd: RunDir) -> list[str]:
    from medsegdiff.data.splits import Splits

    if not rd.splits.is_file():
        raise DataError(f"{rd.splits}: no split yet; run the prepare stage first (--stages prepare)")
    splits = Splits.load(rd.splits)
    if not splits.test:
        raise DataError(f"{rd.splits}: the test split is empty; set data.split.test_fraction > 0")
    return list(splits.test)


def stage_predict(cfg: ExperimentConfig, rd: RunDir, *, progress: bool = True) -> list[Path]:
    from medsegdiff.inference.predict import predict

    ckpt = best_checkpoint(rd)
    cases = test_cases(rd)
    if cfg.inference.calibrate:
        stage_calibrate(cfg, rd, ckpt, progress=progress)
    say(f"[predict] {len(cases)} held-out cases with {ckpt.name} "
        f"({cfg.inference.respacing or cfg.diffusion.respacing}, {cfg.inference.ensemble} members)")
    return predict(ckpt, Path(cfg.data.cache_dir), rd.predictions, overrides=_inference_overrides(cfg), cases=cases,
                   progress=progress)


def stage_calibrate(cfg: ExperimentConfig, rd: RunDir, ckpt: Path, *, progress: bool = True) -> float | None:
    """Sweep the threshold on the validation cases; predict then applies ``<run>/calibration.json``."""
    from medsegdiff.inference.calibration import calibrate_checkpoint, validation_cases

    cases = validation_cases(rd.root)
    if not cases:
        say("[calibrate] no validation cases; keeping inference.threshold")
        return None
    best, _, path = calibrate_checkpoint(ckpt, Path(cfg.data.cache_dir), cases, overrides=_inference_overrides(cfg),
                                         run_dir=rd.root, progress=progress)
    say(f"[calibrate] threshold {best:.2f} from {len(cases)} validation cases -> {path}")
    return best


def _inference_overrides(cfg: ExperimentConfig) -> list[str]:
    """The run's current inference settings (they may differ from the ones in the checkpoint)."""
    return [f"inference.{k}={json.dumps(v)}" for k, v in to_dict(cfg.inference).items()]


# --------------------------------------------------------------------------- evaluate
def stage_evaluate(cfg: ExperimentConfig, rd: RunDir, *, progress: bool = True) -> dict[str, Any]:
    """Score the model predictions and the Tmax baseline on the same held-out cases.

    The reference masks are read from ``data.root`` (native grids, as the challenge scores).
    """
    from medsegdiff.baselines.tmax import tmax_baseline
    from medsegdiff.evaluation.evaluate import evaluate

    cases = test_cases(rd)
    gt = Path(cfg.data.root)
    ev = cfg.evaluation
    kw: dict[str, Any] = dict(iou_threshold=ev.iou_threshold, hd95=ev.hd95, cases=cases, progress=progress)
    if hasattr(ev, "connectivity"):
        kw["connectivity"] = ev.connectivity
    say(f"[evaluate] model predictions in {rd.predictions}")
    model = evaluate(rd.predictions, gt, rd.evaluation, **kw)
    say(f"[evaluate] Tmax > {ev.tmax_threshold:g} s baseline on the same {len(cases)} cases")
    tmax_baseline(gt, rd.baseline_predictions, threshold=ev.tmax_threshold, cases=cases, progress=progress)
    base = evaluate(rd.baseline_predictions, gt, rd.baseline_evaluation, **kw)
    refs = evaluate_references(gt, Path(cfg.data.cache_dir), rd.root / "references", cases, kw, progress=progress)
    results = {
        "cases": cases,
        "iou_threshold": ev.iou_threshold,
        "model": summary_of(model),
        "baseline_tmax": summary_of(base),
        "references": {name: summary_of(r) for name, r in refs.items()},
        "per_case": {"model": model.get("cases", []), "baseline_tmax": base.get("cases", []),
                     **{name: r.get("cases", []) for name, r in refs.items()}},
        "paths": {
            "run_dir": str(rd.root),
            "predictions": str(rd.predictions),
            "evaluation": str(rd.evaluation),
            "baseline": str(rd.baseline_predictions.parent),
        },
    }
    atomic_write_json(rd.results, _json_safe(results))
    return results


def evaluate_references(gt: Path, cache: Path, out_root: Path, cases: Sequence[str], kw: Mapping[str, Any], *,
                        progress: bool = True) -> dict[str, dict[str, Any]]:
    """Score the CBF-informed rule and the resolution ceiling on ``cases`` (a missing map skips a rule)."""
    from medsegdiff.baselines.references import write_references
    from medsegdiff.evaluation.evaluate import evaluate

    out: dict[str, dict[str, Any]] = {}
    for name in ("cbf_rule", "ceiling"):
        try:
            folder = write_references(gt, cache, out_root, cases=cases, names=[name], progress=progress)[name]
        except DataError as err:
            say(f"[evaluate] reference {name} skipped: {err}")
            continue
        out[name] = evaluate(folder, gt, folder.parent / "evaluation", **{**kw, "progress": progress})
    return out


def _json_safe(obj: Any) -> Any:
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def summary_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """Mean of every metric of an evaluation report (``report["metrics"][key]["mean"]``)."""
    metrics = report.get("metrics", report) if isinstance(report, Mapping) else {}
    out = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping) and "mean" in v:
            out[k] = v["mean"]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def format_table(results: Mapping[str, Any]) -> str:
    """A short text table: one row per method, the ISLES24 metrics as columns."""
    from medsegdiff.baselines.references import reference_label

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


# --------------------------------------------------------------------------- the pipeline
def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise DataError(f"{path}: rank {_rank()} waited {timeout_s:.0f} s for rank 0 to prepare the data")
        time.sleep(1.0)


def run_experiment(
    cfg: ExperimentConfig,
    reference: ExperimentConfig | None = None,
    *,
    stages: Sequence[str] | str | None = None,
    resume: bool = False,
    command: Sequence[str] | None = None,
    progress: bool = True,
    tracker_factory: Callable[[ExperimentConfig, Path], Any] | None = None,
) -> PipelineResult:
    """Run the pipeline for one experiment (see the module docstring).

    Args:
        cfg: the resolved config (experiment file + overrides).
        reference: the experiment file without overrides (for the run-directory name).
        stages: subset of :data:`STAGES`; a run without ``train`` reuses the existing run directory.
        resume: continue the newest run directory of this config from its latest checkpoint.
        command: the command line recorded in ``meta.json``.
        progress: progress bars.
        tracker_factory: ``(cfg, run_dir) -> Tracker``; default :func:`medsegdiff.tracking.make_tracker`.

    Raises:
        MedSegDiffError: for expected problems (bad config, missing data, missing checkpoint).
    """
    stages = parse_stages(stages)
    reuse = resume or "prepare" not in stages or "train" not in stages
    if "prepare" in stages and _rank() == 0:
        check_data_root(cfg)  # before a run directory is made for nothing
    rd, cfg = init_shared_run_dir(cfg, reference, resume=reuse, command=command)
    rank = _rank()
    result = PipelineResult(run_dir=rd.root, stages=stages, cfg=cfg)
    say(f"[run] {rd.root}")
    if tracker_factory is None:
        from medsegdiff.tracking import make_tracker

        tracker_factory = make_tracker
    status = "failed"
    with log_to_file(rd.logs / ("run.log" if rank == 0 else f"run.rank{rank}.log")):
        tracker = tracker_factory(cfg, rd.root)
        try:
            # ---- prepare (rank 0), the other ranks wait for the split
            if "prepare" in stages:
                if rank == 0:
                    manifest, _ = stage_prepare(cfg, rd, resume=reuse, progress=progress)
                    cfg = with_data_paths(cfg, Path(manifest.cache_dir) if hasattr(manifest, "cache_dir")
                                          else cache_dir_for(cfg, Path(cfg.data.root)), rd.splits)
                    save_config(cfg, rd.config)
                else:
                    _wait_for(rd.splits)
                    cfg = with_data_paths(cfg, cache_dir_for(cfg, Path(cfg.data.root)), rd.splits)
            elif not cfg.data.cache_dir:
                raise DataError(f"{rd.root}: no prepared data for this run; include the prepare stage")
            result.cfg = cfg
            # ---- train (every rank)
            if "train" in stages:
                result.train = stage_train(cfg, rd, resume=resume, tracker=tracker if rank == 0 else None,
                                           progress=progress)
            if rank != 0:
                status = "done"
                return result
            # ---- predict + evaluate (rank 0)
            if "predict" in stages:
                stage_predict(cfg, rd, progress=progress)
            if "evaluate" in stages:
                results = stage_evaluate(cfg, rd, progress=progress)
                step = int(getattr(result.train, "steps", 0) or cfg.train.steps)
                log_results(tracker, results, step)
                result.results = results
                print("\n" + format_table(results), flush=True)
                print_locations(rd, tracker)
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            tracker.finish()
            if rank == 0:
                finish_meta(rd, status=status, stages=stages)
    return result


def print_locations(rd: RunDir, tracker: Any) -> None:
    from medsegdiff.tracking import wandb_location

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
