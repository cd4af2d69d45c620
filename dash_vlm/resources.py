"""Where the bundled ``tasks/`` and ``assets/`` folders are: the repository's top level in a checkout or an
editable install, ``dash_vlm/_bundled/`` inside an installed wheel."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def bundled(name: str) -> Path:
    """The folder ``name`` (``"tasks"`` or ``"assets"``) shipped with dash-vlm."""
    if name not in ("tasks", "assets"):
        raise ValueError(f"name must be 'tasks' or 'assets', got {name!r}")
    installed = PACKAGE / "_bundled" / name
    return installed if installed.is_dir() else PACKAGE.parent / name


def tasks_folder() -> Path:
    """The lmms-eval tasks folder, for ``lmms-eval --include_path``."""
    return bundled("tasks")
