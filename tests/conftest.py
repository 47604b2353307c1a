"""Shared pytest configuration.

Registers the ``gpu`` marker: tests marked ``@pytest.mark.gpu`` need a CUDA device and are skipped
automatically where ``torch.cuda.is_available()`` is False (the CPU CI machine).
"""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """A repository script (``bench/sweep.py``, ...) imported as a module named by its stem."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when torch.cuda.is_available() is False")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def edited_schedule(tmp_path, monkeypatch):
    """``edit(arch, old, new)``: make the shipped schedule of ``arch``, with its first ``old``
    replaced by ``new``, this test's schedule (``$FSAGEN_SCHEDULES_DIR``); undone after the test.
    Several calls for one arch accumulate."""
    from fsagen import schedule
    from fsagen.paths import schedules_dir

    shipped = schedules_dir()

    def edit(arch: str, old: str, new: str) -> None:
        edited = tmp_path / f"{arch}.toml"
        text = (edited if edited.exists() else shipped / f"{arch}.toml").read_text()
        assert old in text, f"{arch}.toml has no {old!r}"
        edited.write_text(text.replace(old, new, 1))
        monkeypatch.setenv("FSAGEN_SCHEDULES_DIR", str(tmp_path))
        schedule.load_schedule.cache_clear()

    yield edit
    monkeypatch.delenv("FSAGEN_SCHEDULES_DIR", raising=False)
    schedule.load_schedule.cache_clear()
