"""Learning benchmark: methods trained on the same synthetic splits at equal steps, scored with CIs.

``medsegdiff bench learn`` (library: :func:`run_learn_bench`) answers "did this change help?" with
numbers that can be trusted:

1. **Data.** For each data seed (default 0, 1, 2) a synthetic ISLES24 look-alike
   (:func:`medsegdiff.data.synthetic.generate_dataset`, ``--cases`` cases) and one subject split
   with ``--test-cases`` test (default 12) and ``--val-cases`` validation cases, saved as
   ``data/seed<k>/splits.json`` and given to every method (``data.split.file``), so all methods
   see exactly the same training, validation and test subjects.
2. **Methods.** A method is a name and a list of config overrides on top of the base experiment
   (``experiments/quickstart.yaml``) and the bench's common overrides (:func:`common_overrides`:
   equal optimiser steps ``train.steps`` with no time budget, validation every quarter of the
   run, one network call per member and 3 members for validation and the test predictions
   (:data:`SAMPLING`), no W&B). Defaults:
   :data:`DEFAULT_METHODS` (V1 x0, V1 with the paper's epsilon objective, V1 with v-prediction and
   self-conditioning, V2, DynUNet). A YAML
   file adds more (:func:`~medsegdiff.bench.learn_methods.load_methods_file`); any new config option is a
   one-line method.
3. **Runs.** Each (method, seed) is a normal run directory ``runs/<method>/seed<k>`` made by the
   public pipeline (:func:`medsegdiff.pipeline.run.run_experiment`, stages
   ``prepare,train`` then ``prepare,predict``, which also calibrates the threshold on the
   validation cases when the config says so), then scored with
   :func:`medsegdiff.evaluation.evaluate.evaluate` (the official metrics, every per-case key
   passed through). A finished (method, seed) leaves ``bench_result.json`` and is skipped next
   time; an interrupted one resumes from its latest checkpoint. ``--jobs N`` (default: one per
   CPU core, at most 4) runs N of them at a time, each in its own process with ``cores / N``
   threads (:func:`run_methods`); the results are those of a sequential run.
4. **References** on the same test cases (:mod:`medsegdiff.baselines.references`): Tmax > 9 s,
   the CBF-informed rule (Tmax > 6 s and CBF < 15 on the native maps), the resolution ceiling
   (the reference mask through the first method's cache grid and back) and the acute-core oracle
   (the part of the lesion the acute images show; the rest is growth no model can see).
5. **Statistics** over all test cases of all seeds (:func:`medsegdiff.metrics.bootstrap.stratified_bootstrap`): the mean and
   a 95 % percentile-bootstrap CI, resampling cases with replacement *within each seed*
   (stratified, so every resample keeps the seed mix; 2000 resamples, fixed generator), for every
   per-case metric. Paired differences to each ``--reference`` (a method or a reference name) are
   bootstrapped the same way on the per-case differences ``method - reference`` of the same
   case, which removes the case-to-case spread that dominates unpaired comparisons.
6. **Output** in ``--out``: ``report.json`` (everything), ``report.txt`` (the table),
   ``dice_vs_steps.png`` (validation Dice per method, mean over seeds) and
   ``paired_differences.png`` (paired differences with their CIs).

Timing: ``train_seconds`` is the wall time of the train stage (validation during training
included), ``sample_seconds`` that of the predict stage (threshold calibration on the validation
cases included), both per (method, seed). The report also records the process CPU time and the
load average at start and end, because the wall time means little on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.baselines.references import REFERENCES, available_references, write_references
from medsegdiff.bench.learn_methods import (
    DEFAULT_METHODS,
    DEFAULT_REFERENCES,
    load_methods_file,
    select_methods,
)
from medsegdiff.bench.learn_report import format_table, write_plots
from medsegdiff.config import load_config
from medsegdiff.config.data import SplitConfig
from medsegdiff.data.cache import Manifest, cache_settings, settings_hash
from medsegdiff.data.preprocess import prepare_dataset
from medsegdiff.data.splits import Splits, make_splits
from medsegdiff.data.synthetic import generate_dataset
from medsegdiff.errors import ConfigError
from medsegdiff.evaluation.evaluate import evaluate
from medsegdiff.metrics.bootstrap import metric_stats, paired_difference, stratified_bootstrap
from medsegdiff.pipeline.run import run_experiment
from medsegdiff.pipeline.rundir import changed_settings
from medsegdiff.tracking import read_metrics
from medsegdiff.training.checkpoint import find_latest
from medsegdiff.utils.io import atomic_write_json, atomic_write_text
from medsegdiff.utils.jsonable import json_safe
from medsegdiff.utils.parallel import run_parallel, threads_per_worker

BASE_EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"

RESULT = "bench_result.json"
SAMPLING_ONLY = ("inference.", "evaluation.")  # settings a finished run can change without training again
MAX_AUTO_JOBS = 4  # default --jobs: one run per core, at most this many (memory)


@dataclasses.dataclass
class LearnBenchSettings:
    """What :func:`run_learn_bench` runs (defaults = ``medsegdiff bench learn`` without flags).

    Attributes:
        out_dir: output folder (data, runs, report); reused to resume.
        seeds: data seeds (each also the model seed of its runs).
        cases: synthetic cases per seed (one imitates a missing CTA and is skipped).
        test_cases, val_cases: split sizes per seed; the rest trains.
        steps: optimiser steps of every method.
        methods: ``{name: overrides}`` in run order.
        references: names for the paired differences (methods or :data:`~medsegdiff.baselines.references.REFERENCES`).
        base: the experiment file the methods modify.
        overrides: applied to every method after the bench's own (before the method's).
        shape: synthetic volume size (``tiny`` or ``XxYxZ``).
        bootstrap: bootstrap resamples.
        iou_threshold: lesion matching IoU for the lesion-wise F1.
        jobs: (method, seed) runs at a time, each in its own process (:func:`run_methods`).
    """

    out_dir: Path
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    cases: int = 32
    test_cases: int = 12
    val_cases: int = 3
    steps: int = 300
    methods: dict[str, list[str]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_METHODS))
    references: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_REFERENCES))
    base: Path = BASE_EXPERIMENT
    overrides: list[str] = dataclasses.field(default_factory=list)
    shape: str = "tiny"
    bootstrap: int = 2000
    iou_threshold: float = 0.5
    jobs: int = 1


# --quick: seconds per run (tests). Two seeds (the stratified CI needs strata), a diffusion model
# and DynUNet (unless --methods says otherwise), 4 steps, one validation, DDIM 5, no calibration.
QUICK = dict(seeds=[0, 1], cases=7, test_cases=2, val_cases=1, steps=4, bootstrap=200, shape="24x24x6")
QUICK_METHODS = ("v1_x0", "dynunet")
QUICK_OVERRIDES = ["data.image_size=24", "train.batch_size=4", "train.log_every=2", "train.validation.every=4",
                   "train.validation.respacing=ddim5", "inference.respacing=ddim5", "inference.calibrate=false",
                   "model.dynunet_filters=[8,16,32]"]


# How the bench samples (validation and test): one network call, the model's x0 estimate at
# t = T - 1. For models trained with Dice/BCE on x0_hat at every timestep (x0, v) a single member's
# Dice falls with the number of calls (issue 13: 0.827 with 1 call, 0.772 with 10 and 0.790 for
# DDIM 25 x 3 on development seed 3, whose cases no default was scored on); methods that need
# several steps (the epsilon objective) override it (learn_methods.MULTI_STEP).
ONE_CALL = "trailing1"
SAMPLING = ["inference.sampler=x0", f"inference.respacing={ONE_CALL}"]


def common_overrides(steps: int) -> list[str]:
    """The bench's overrides for every method: equal steps, cheap but real validation and sampling."""
    every = max(1, steps // 4)
    return [
        f"train.steps={steps}", "train.time_budget_s=0", f"train.validation.every={every}",
        "train.validation.max_cases=0", f"train.validation.respacing={ONE_CALL}", "train.validation.ensemble=1",
        f"train.checkpoint_every={every}", *SAMPLING, "inference.ensemble=3",
        "inference.overlays=false", "tracking.backend=none", "data.synthetic.generate=false",
    ]


# ----------------------------------------------------------------------------------------- runs


def _fingerprint(overrides: Sequence[str]) -> str:
    return hashlib.sha1(json.dumps(list(overrides)).encode()).hexdigest()[:12]


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"[bench learn] {message}", file=sys.stderr, flush=True)


def _pipeline_output(progress: bool) -> contextlib.AbstractContextManager[Any]:
    """The pipeline's progress lines go to stderr (or nowhere): stdout carries the bench's JSON."""
    return contextlib.redirect_stdout(sys.stderr if progress else io.StringIO())


@dataclasses.dataclass
class SeedData:
    """One data seed: the generated root, its split and the first method's cache."""

    seed: int
    root: Path
    splits_file: Path
    test: list[str]
    cache: Path | None = None


def prepare_seed(settings: LearnBenchSettings, seed: int, first_cfg: Any, *, progress: bool) -> SeedData:
    """Generate (or reuse) the dataset of one seed, prepare the first method's cache, fix the split.

    Raises:
        ConfigError: the split cannot hold ``test_cases + val_cases`` and at least 2 training cases.
    """
    root = settings.out_dir / "data" / f"seed{seed}"
    generate_dataset(root / "dataset", cases=settings.cases, seed=seed, shape=settings.shape)
    cache = cache_dir(settings, seed, first_cfg)
    manifest = prepare_dataset(root / "dataset", cache, first_cfg.data, workers=1, progress=False)
    n = len(manifest.case_ids)
    if n < settings.test_cases + settings.val_cases + 2:
        raise ConfigError(f"--cases {settings.cases}: only {n} usable cases for {settings.test_cases} test + "
                          f"{settings.val_cases} validation + >= 2 training cases; raise --cases")
    splits_file = root / "splits.json"
    if splits_file.is_file():
        splits = Splits.load(splits_file, manifest.case_ids)
    else:
        split_cfg = SplitConfig(seed=seed, test_fraction=settings.test_cases / n, val_fraction=settings.val_cases / n)
        splits = make_splits(manifest.case_ids, split_cfg)
        splits.save(splits_file)
    _say(f"seed {seed}: {n} cases, {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test",
         progress)
    return SeedData(seed, root / "dataset", splits_file, list(splits.test), cache)


def cache_dir(settings: LearnBenchSettings, seed: int, cfg: Any) -> Path:
    """``<out>/cache/seed<k>/<settings hash>``: shared by the methods with the same preprocessing."""
    return settings.out_dir / "cache" / f"seed{seed}" / settings_hash(cache_settings(cfg.data))


def method_overrides(settings: LearnBenchSettings, name: str, seed: int, data: SeedData | None) -> list[str]:
    """Every override of one (method, seed) run, in order: bench, user, method, paths."""
    run_dir = settings.out_dir / "runs" / name / f"seed{seed}"
    paths = [f"seed={seed}", f"run_root={settings.out_dir}", f"run_dir={run_dir}"]
    if data is not None:
        paths += [f"data.root={data.root}", f"data.split.file={data.splits_file}"]
    return [*common_overrides(settings.steps), *settings.overrides, *settings.methods[name], *paths]


def load_method_config(settings: LearnBenchSettings, name: str, seed: int, data: SeedData | None) -> Any:
    """The resolved config of one (method, seed) run (with its cache folder).

    Raises:
        ConfigError: naming the method, when its overrides do not make a valid config.
    """
    overrides = method_overrides(settings, name, seed, data)
    try:
        cfg = load_config(settings.base, overrides)
    except ConfigError as err:
        raise ConfigError(f"method '{name}' ({' '.join(settings.methods[name]) or 'no overrides'}): {err}") from None
    return load_config(settings.base, [*overrides, f"data.cache_dir={cache_dir(settings, seed, cfg)}"])


def stale_settings(cfg: Any, run_dir: Path) -> list[tuple[str, Any]]:
    """Result-relevant settings of ``cfg`` that differ from the run's saved ``config.yaml``.

    The data paths the pipeline pins in a run (cache folder, the run's own copy of the split) are
    not compared; no saved config (no run yet) is no change, an unreadable one counts as changed.
    """
    if not (run_dir / "config.yaml").is_file():
        return []
    try:
        saved = load_config(run_dir / "config.yaml")
    except (ConfigError, OSError) as err:
        return [("config.yaml", f"unreadable: {str(err).splitlines()[0]}")]
    return [(k, v) for k, v in changed_settings(cfg, saved) if k not in ("data.cache_dir", "data.split.file")]


def validation_history(run_dir: Path) -> list[list[float]]:
    """``[[step, val/dice], ...]`` from the run's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [[float(r["step"]), float(r["val/dice"])] for r in read_metrics(path)
            if "val/dice" in r and "step" in r and r["val/dice"] is not None]


def run_method(settings: LearnBenchSettings, name: str, data: SeedData, *, progress: bool) -> dict[str, Any]:
    """Train, predict and score one (method, seed); reuse ``bench_result.json`` when it is up to date."""
    cfg = load_method_config(settings, name, data.seed, data)
    run_dir = Path(cfg.run_dir)
    overrides = method_overrides(settings, name, data.seed, data)
    fingerprint = _fingerprint(overrides)
    done = _read_json(run_dir / RESULT)
    stale = stale_settings(cfg, run_dir)
    trained_stale = [(k, v) for k, v in stale if not k.startswith(SAMPLING_ONLY)]
    changes = ", ".join(f"{k}={v!r}" for k, v in (trained_stale or stale)[:4])
    if trained_stale:
        # the folder holds a run trained with other settings (a method's overrides, the base
        # experiment or a default changed): keep it aside and start again; resuming would reuse its weights
        moved = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(moved)
        done = None
        _say(f"{name} seed {data.seed}: its settings changed since it ran ({changes}); old run kept in {moved}, "
             "running again", progress)
    elif stale:  # only how it samples or scores changed: the trained model stands, predict again
        if done is not None:
            (run_dir / RESULT).rename(run_dir / f"bench_result.stale-{time.strftime('%Y%m%d-%H%M%S')}.json")
        done = None
        _say(f"{name} seed {data.seed}: its sampling settings changed since it ran ({changes}); predicting again "
             "with the trained model", progress)
    if done is not None and done.get("cases") is not None:
        # same resolved settings (however the overrides are spelled): the result stands
        _say(f"{name} seed {data.seed}: done before, reused", progress)
        return done
    trained = _read_json(run_dir / "bench_train.json")
    if trained is None:  # (a folder with other settings was moved aside above)
        resumed = find_latest(run_dir) is not None
        _say(f"{name} seed {data.seed}: training {settings.steps} steps" + (" (resuming)" if resumed else ""),
             progress)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        with _pipeline_output(progress):
            result = run_experiment(cfg, stages="prepare,train", resume=True, progress=False)
        steps = int(getattr(result.train, "steps", 0) or 0)
        trained = {"fingerprint": fingerprint, "seconds": time.perf_counter() - t0,
                   "cpu_seconds": _cpu_seconds() - c0, "steps": steps, "resumed": resumed}
        atomic_write_json(run_dir / "bench_train.json", trained)
    _say(f"{name} seed {data.seed}: predicting {len(data.test)} test cases", progress)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    # the method's config: the run's saved data (cache, split) and model, today's sampling settings
    with _pipeline_output(progress):
        run_experiment(cfg, stages="prepare,predict", resume=True, progress=False)
    sample_s, sample_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    report = evaluate(run_dir / "predictions", data.root, run_dir / "evaluation", iou_threshold=settings.iou_threshold,
                      cases=data.test, progress=False)
    ceiling = Manifest.open(cfg.data.cache_dir).data.get("resolution_ceiling", {})
    out = {
        "method": name, "seed": data.seed, "fingerprint": fingerprint, "overrides": list(settings.methods[name]),
        "run_dir": str(run_dir), "steps": trained["steps"], "train_seconds": trained["seconds"],
        "train_cpu_seconds": trained["cpu_seconds"], "train_resumed": trained["resumed"],
        "sample_seconds": sample_s, "sample_cpu_seconds": sample_cpu,
        "history": validation_history(run_dir), "resolution_ceiling": ceiling.get("mean_dice"),
        "cases": report["cases"],
    }
    atomic_write_json(run_dir / RESULT, json_safe(out))
    _say(f"{name} seed {data.seed}: test Dice {np.mean([r['dice'] for r in report['cases']]):.3f} "
         f"(train {trained['seconds']:.0f} s, sample {sample_s:.0f} s)", progress)
    return out


def run_methods(settings: LearnBenchSettings, tasks: Sequence[tuple[str, SeedData]], *,
                progress: bool) -> list[dict[str, Any]]:
    """:func:`run_method` for every ``(method, seed data)``, ``settings.jobs`` at a time; results in task order.

    With ``jobs > 1`` each (method, seed) runs in its own spawned process with
    ``cpu_count // jobs`` CPU threads (:mod:`medsegdiff.utils.parallel`); every run has its own run
    directory, so the results are those of a sequential run.
    """
    if settings.jobs <= 1 or len(tasks) <= 1:
        return [run_method(settings, name, data, progress=progress) for name, data in tasks]
    workers = min(settings.jobs, len(tasks))
    threads = threads_per_worker(workers)
    _say(f"{len(tasks)} runs, {workers} at a time ({threads} CPU thread(s) each)", progress)
    calls = [((settings, name, data), {"progress": progress}) for name, data in tasks]
    results = dict(run_parallel(run_method, calls, workers=workers, threads=threads))
    return [results[i] for i in range(len(tasks))]


def run_references(settings: LearnBenchSettings, data: SeedData, *, progress: bool) -> dict[str, list[dict]]:
    """Score the references on the seed's test cases (reused when done)."""
    out_root = settings.out_dir / "references" / f"seed{data.seed}"
    names = available_references(data.root)
    key = {"test": data.test, "cache": str(data.cache), "iou": settings.iou_threshold, "names": names}
    done = _read_json(out_root / RESULT)
    if done is not None and done.get("key") == key:
        return done["cases"]
    folders = write_references(data.root, data.cache, out_root, cases=data.test, names=names, progress=False)
    cases = {name: evaluate(folders[name], data.root, folders[name].parent / "evaluation",
                            iou_threshold=settings.iou_threshold, cases=data.test, progress=False)["cases"]
             for name in names}
    atomic_write_json(out_root / RESULT, json_safe({"key": key, "cases": cases}))
    _say(f"seed {data.seed} references: " + ", ".join(
        f"{n} {np.mean([r['dice'] for r in rows]):.3f}" for n, rows in cases.items()), progress)
    return cases


def run_learn_bench(settings: LearnBenchSettings, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the benchmark and write its report (see the module docstring).

    Returns:
        The report (also in ``<out>/report.json``): ``settings``, ``methods`` and ``references``
        (per name: every metric's mean / CI, the paired differences, times, validation history),
        ``table``, ``plots``, ``wall_seconds``, ``cpu_seconds``, ``load_average``.

    Raises:
        ConfigError: a method's overrides are invalid (checked for every method before anything
            runs), an unknown reference name, or too few cases for the split.
    """
    t0, c0 = time.perf_counter(), _cpu_seconds()
    load_start = _load_average()
    if not settings.methods:
        raise ConfigError("bench learn: no method to run")
    for ref in settings.references:
        if ref not in settings.methods and ref not in REFERENCES:
            raise ConfigError(f"--reference: unknown name '{ref}'; allowed: a method ({', '.join(settings.methods)}) "
                              f"or a reference ({', '.join(REFERENCES)})")
    names = list(settings.methods)
    for name in names:  # every config is checked before the first minute of training
        load_method_config(settings, name, settings.seeds[0], None)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[int, list[dict]]] = {n: {} for n in names}
    tasks: list[tuple[str, SeedData]] = []
    for seed in settings.seeds:  # data and references first (cheap), then the runs
        first = load_method_config(settings, names[0], seed, None)
        data = prepare_seed(settings, seed, first, progress=progress)
        for name, cases in run_references(settings, data, progress=progress).items():
            rows.setdefault(name, {})[seed] = cases
        tasks += [(name, data) for name in names]
    results = run_methods(settings, tasks, progress=progress)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for (name, data), res in zip(tasks, results):
        runs[name].append(res)
        rows[name][data.seed] = res["cases"]
    report = summarize(settings, rows, runs)
    report.update({"wall_seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0,
                   "load_average": {"start": load_start, "end": _load_average()},
                   "cpu_count": os.cpu_count()})
    report["table"] = format_table(report)
    report["plots"] = [str(p) for p in write_plots(report, settings.out_dir)]
    atomic_write_json(settings.out_dir / "report.json", json_safe(report))
    atomic_write_text(settings.out_dir / "report.txt", report["table"] + "\n")
    return report


def summarize(settings: LearnBenchSettings, rows: Mapping[str, Mapping[int, list[dict]]],
              runs: Mapping[str, list[dict]]) -> dict[str, Any]:
    """Per method and reference: metric statistics, paired differences, times, validation history."""
    out: dict[str, Any] = {"settings": _settings_dict(settings), "methods": {}, "references": {}}
    for name, by_seed in rows.items():
        entry: dict[str, Any] = {"metrics": metric_stats(by_seed, resamples=settings.bootstrap),
                                 "paired": {ref: paired_difference(by_seed, rows[ref], resamples=settings.bootstrap)
                                            for ref in settings.references if ref != name}}
        if name in runs:
            rs = runs[name]
            entry.update({
                "overrides": list(settings.methods[name]),
                "steps": [r["steps"] for r in rs],
                "train_seconds": _total_mean([r["train_seconds"] for r in rs]),
                "sample_seconds": _total_mean([r["sample_seconds"] for r in rs]),
                "train_cpu_seconds": _total_mean([r["train_cpu_seconds"] for r in rs]),
                "sample_cpu_seconds": _total_mean([r["sample_cpu_seconds"] for r in rs]),
                "resolution_ceiling": [r.get("resolution_ceiling") for r in rs],
                "history": {str(r["seed"]): r["history"] for r in rs},
                "run_dirs": [r["run_dir"] for r in rs],
            })
            out["methods"][name] = entry
        else:
            out["references"][name] = entry
    return out


def _total_mean(values: Sequence[float]) -> dict[str, float]:
    return {"total": float(sum(values)), "mean": float(np.mean(values)) if values else 0.0}


def _settings_dict(settings: LearnBenchSettings) -> dict[str, Any]:
    d = dataclasses.asdict(settings)
    d["out_dir"], d["base"] = str(settings.out_dir), str(settings.base)
    d["common_overrides"] = common_overrides(settings.steps)
    d["ci"] = ("95 % percentile bootstrap over test cases, resampled within each data seed "
               f"({settings.bootstrap} resamples); paired differences bootstrapped the same way on "
               "per-case differences")
    return d


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/bench_learn", help="output folder (reused: finished runs are skipped)")
    p.add_argument("--seeds", default=None, help="data seeds, comma-separated (default 0,1,2)")
    p.add_argument("--cases", type=int, default=None, help="synthetic cases per seed (default 32)")
    p.add_argument("--test-cases", type=int, default=None, help="test cases per seed (default 12)")
    p.add_argument("--val-cases", type=int, default=None, help="validation cases per seed (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of every method (default 300)")
    p.add_argument("--methods-file", metavar="FILE.yaml", help="extra methods (see load_methods_file)")
    p.add_argument("--methods", default="", help="run only these methods, comma-separated")
    p.add_argument("--reference", default="", help="paired differences against these names (default cbf_rule,v1_x0)")
    p.add_argument("--base", default=str(BASE_EXPERIMENT), help="base experiment file (default the quickstart)")
    p.add_argument("--override", action="append", default=[], metavar="key=value",
                   help="config override for every method (repeatable)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 2000)")
    p.add_argument("--jobs", type=int, default=None,
                   help="(method, seed) runs at a time, each in its own process with cpu_count / jobs threads "
                   f"(default: the CPU count, at most {MAX_AUTO_JOBS}; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke version (tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def settings_from_args(args: argparse.Namespace) -> LearnBenchSettings:
    """:class:`LearnBenchSettings` from the command line (``--quick`` first, explicit flags win).

    Raises:
        ConfigError: bad flag values or methods file.
    """
    kw: dict[str, Any] = dict(QUICK) if args.quick else {}
    overrides = list(QUICK_OVERRIDES) if args.quick else []
    if args.seeds is not None:
        try:
            kw["seeds"] = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--seeds: got {args.seeds!r}; allowed: integers separated by commas, "
                              "e.g. 0,1,2") from None
    if not kw.get("seeds", [0]):
        raise ConfigError("--seeds: empty; give at least one seed, e.g. --seeds 0,1,2")
    kw["jobs"] = 1 if args.quick else min(os.cpu_count() or 1, MAX_AUTO_JOBS)
    for flag, key in (("cases", "cases"), ("test_cases", "test_cases"), ("val_cases", "val_cases"),
                      ("steps", "steps"), ("bootstrap", "bootstrap"), ("jobs", "jobs")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{flag.replace('_', '-')}: got {value}; allowed: an integer >= 1")
            kw[key] = value
    extra, only, refs = None, None, None
    if args.methods_file:
        loaded = load_methods_file(args.methods_file)
        extra, only, refs = loaded["methods"], loaded["only"], loaded["reference"]
        overrides += loaded["overrides"]
    if args.methods:
        only = [m.strip() for m in args.methods.split(",") if m.strip()]
    elif args.quick and only is None:
        only = list(QUICK_METHODS)
    if args.reference:
        refs = [r.strip() for r in args.reference.split(",") if r.strip()]
    base = Path(args.base)
    if not base.is_file():
        raise ConfigError(f"--base: {base} does not exist; pass an experiment YAML (default {BASE_EXPERIMENT})")
    methods = select_methods(DEFAULT_METHODS, extra, only)
    if refs is None:
        refs = [r for r in DEFAULT_REFERENCES if r in methods or r in REFERENCES]
    return LearnBenchSettings(out_dir=Path(args.out), methods=methods, references=refs, base=base,
                              overrides=[*overrides, *args.override], **kw)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``medsegdiff bench learn``: print the table; return a short JSON summary."""
    settings = settings_from_args(args)
    report = run_learn_bench(settings, progress=not args.no_progress)
    print(report["table"], file=sys.stderr, flush=True)
    return {
        "out_dir": str(settings.out_dir), "report": str(settings.out_dir / "report.json"),
        "plots": report["plots"], "wall_seconds": round(report["wall_seconds"], 1),
        "cpu_seconds": round(report["cpu_seconds"], 1), "load_average": report["load_average"],
        "dice": {name: e["metrics"]["dice"] for group in ("methods", "references")
                 for name, e in report[group].items()},
    }


__all__ = [
    "DEFAULT_METHODS",
    "LearnBenchSettings",
    "format_table",
    "load_methods_file",
    "paired_difference",
    "run_learn_bench",
    "select_methods",
    "stratified_bootstrap",
    "summarize",
    "write_plots",
]
