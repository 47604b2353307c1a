"""Render jinja2 templates from templates/ (StrictUndefined: a missing variable is an error)."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _environment():
    import jinja2

    from fsagen.paths import templates_dir

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context) -> str:
    return _environment().get_template(template).render(**context)
