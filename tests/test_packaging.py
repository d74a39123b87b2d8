"""The built wheel works without the source tree: configs ship inside it, the CLI runs elsewhere.

Builds a wheel of this checkout (no build isolation: nothing is downloaded), installs it with
``--no-deps`` into a fresh virtual environment whose only other packages are the current
environment's (torch, monai, ... reached through a ``.pth`` line, so nothing is fetched), and runs
``medsegdiff config`` and a tiny ``medsegdiff run`` of an experiment file copied out of the
repository, from a folder outside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "medsegdiff", "improved_diffusion")
TINY = [
    "data.synthetic.cases=6", "data.image_size=16", "train.steps=2", "train.batch_size=4",
    "train.time_budget_s=0", "train.checkpoint_every=2", "train.validation.every=0",
    "train.validation.respacing=ddim2", "train.validation.max_cases=1", "inference.respacing=ddim2",
    "inference.ensemble=1", "inference.calibrate=false", "tracking.backend=none", "device=cpu",
]


def _clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MEDSEGDIFF_CONFIGS", "VIRTUAL_ENV", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_wheel_installs_and_runs_without_the_source_tree(tmp_path):
    # 1. the wheel, with the YAML blocks inside it (built from a copy: no build/ in the checkout)
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist), str(src)], check=True, timeout=180, capture_output=True,
                   cwd=tmp_path)
    wheel = next(dist.glob("medsegdiff-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    blocks = sorted(n for n in names if n.startswith("medsegdiff/configs/") and n.endswith(".yaml"))
    assert "medsegdiff/configs/data/synthetic.yaml" in blocks and "medsegdiff/configs/model/tiny.yaml" in blocks
    assert len(blocks) == len(list((ROOT / "medsegdiff" / "configs").rglob("*.yaml")))
    assert not any(n.startswith(("tests/", "experiments/")) for n in names)

    # 2. a fresh venv that sees this environment's packages but not the source tree
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=180, capture_output=True)
    env = _clean_env(venv)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import medsegdiff, medsegdiff.config.loader as l; "
                            "print(medsegdiff.__file__); print(l.packaged_configs_dir())"],
                           check=True, capture_output=True, text=True, env=env, cwd=work).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # not the checkout
    exe = venv / "bin" / "medsegdiff"

    # 3. `config` from another folder, with an experiment copied out of the repository
    exp = work / "my_quickstart.yaml"
    shutil.copy(ROOT / "experiments" / "quickstart.yaml", exp)
    proc = subprocess.run([str(exe), "config", str(exp), "train=debug", "model=tiny"],
                          capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: quickstart" in proc.stdout and "image_size" in proc.stdout

    # 4. a tiny end-to-end run there: synthetic data, train, predict, evaluate
    proc = subprocess.run([str(exe), "run", str(exp), *TINY, "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Tmax > 9 s baseline" in proc.stdout
    runs = [p for p in (work / "runs").iterdir() if p.name.startswith("quickstart")]
    assert len(runs) == 1 and (runs[0] / "results.json").is_file()
    assert not (ROOT / "runs" / runs[0].name).exists()
