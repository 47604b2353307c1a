"""The manifest of an AOT build: manifest.json (for tools) and MANIFEST.md (for people)."""
from __future__ import annotations

import json
from pathlib import Path

from fsagen.cache import META
from fsagen.render import render


def artifact_entry(path: Path) -> dict:
    meta = json.loads((path / META).read_text())
    return {
        "name": meta["name"],
        "spec": meta["spec"],
        "plan": meta["plan"],
        "stages": list(meta["stages"]),
        "build_seconds": meta["build_seconds"],
    }


def write_manifest(arch_dir: Path, header: dict, artifact_paths: list[Path]) -> None:
    """header: arch, target, versions, grid, subset, loop_orders."""
    data = {**header, "artifacts": [artifact_entry(p) for p in artifact_paths]}
    (arch_dir / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (arch_dir / "MANIFEST.md").write_text(render("manifest.md.j2", **data))
