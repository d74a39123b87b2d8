"""Fixtures for tracking tests: a fake ``wandb`` module recording every call."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest


class FakeRun:
    def __init__(self, module: FakeWandb, kwargs: dict[str, Any]) -> None:
        self.module = module
        self.kwargs = kwargs
        self.dir = str(Path(kwargs["dir"]) / "wandb" / f"offline-run-x-{kwargs['id']}" / "files")
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        self.finished = False

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        if self.module.log_raises:
            raise RuntimeError("wandb backend died")
        self.module.logged.append((dict(data), step))

    def finish(self) -> None:
        self.finished = True


class FakeWandb(types.SimpleNamespace):
    """Stand-in for the wandb module: ``init``, ``Settings``, ``Table``, ``Image``."""

    def __init__(self, *, init_raises: bool = False, log_raises: bool = False) -> None:
        super().__init__()
        self.init_raises = init_raises
        self.log_raises = log_raises
        self.inits: list[dict[str, Any]] = []
        self.logged: list[tuple[dict[str, Any], int | None]] = []
        self.runs: list[FakeRun] = []

        class Settings:
            def __init__(self, **kw: Any) -> None:
                self.kw = kw

        class Table:
            def __init__(self, columns: list[str], data: list[list[Any]]) -> None:
                self.columns, self.data = columns, data

        self.Settings = Settings
        self.Table = Table

    def init(self, **kwargs: Any) -> FakeRun:
        self.inits.append(kwargs)
        if self.init_raises:
            raise TimeoutError("wandb init timed out")
        run = FakeRun(self, kwargs)
        self.runs.append(run)
        return run


@pytest.fixture
def fake_wandb() -> FakeWandb:
    return FakeWandb()
