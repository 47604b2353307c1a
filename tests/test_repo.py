"""Repository conventions that are easy to break silently."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme_lines = (REPO / "README.md").read_text().splitlines()
    test_command = readme_lines[1].strip()
    ci_commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ci_commands[-1] == test_command


def test_data_files_are_found_from_the_source_tree():
    from fsagen import paths

    assert paths.source_tree() == REPO
    assert (paths.schedules_dir() / "sm90.toml").is_file()
    assert (paths.templates_dir() / "manifest.md.j2").is_file()
    assert paths.default_grid_file().is_file()


def test_every_python_package_is_installed():
    """pyproject lists packages explicitly (the data folders are mapped in); a new one must be added."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(d.relative_to(REPO).parts)
        for d in (REPO / "fsagen").rglob("*")
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    } | {"fsagen"}
    assert on_disk <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_public_names_are_not_shadowed_by_submodules():
    """``fsagen.<name>`` must stay the public function even after every submodule is imported:
    importing a submodule binds its name on the package, so no module may share a public name."""
    import importlib
    import pkgutil

    import fsagen

    for info in pkgutil.iter_modules(fsagen.__path__):
        if info.name != "kernels":  # needs TileLang; holds no public name
            importlib.import_module(f"fsagen.{info.name}")
    for name in fsagen._PUBLIC:
        assert callable(getattr(fsagen, name)) and not isinstance(getattr(fsagen, name), type(fsagen)), name
