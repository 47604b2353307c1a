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
