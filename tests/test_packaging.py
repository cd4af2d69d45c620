"""A non-editable install ships the bundled tasks and assets inside the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_tasks_and_assets(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("dash_vlm-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    probe = "from dash_vlm.resources import bundled, tasks_folder; print(tasks_folder()); print(bundled('assets'))"
    output = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True
    )
    assert output.returncode == 0, output.stderr
    tasks, assets = (Path(line) for line in output.stdout.split())
    assert tasks == target / "dash_vlm" / "_bundled" / "tasks" and assets.parent == tasks.parent
    assert (tasks / "dash_shapes" / "test.parquet").is_file() and (tasks / "dash_pope" / "dash_pope.yaml").is_file()
    assert (assets / "models" / "dash-shapes-qwen2-vl" / "model.safetensors").is_file()
    assert (assets / "demo" / "shapes.png").is_file()
    assert (target / "dash_vlm" / "models" / "templates" / "qwen3_vl.jinja").is_file()  # Qwen3-VL's chat template
