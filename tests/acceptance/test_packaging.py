"""The wheel users install carries the migrations and works on its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import schema

ROOT = Path(__file__).resolve().parents[2]
_NOT_SOURCE = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from the working tree, as `pip install .` would build it."""
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build leaves build/lib behind, whose stale modules would
    # end up in later wheels.
    source = tmp_path_factory.mktemp("source") / "outbox-relay"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("outbox_relay-*.whl")
    return built


def test_wheel_ships_every_migration_and_type_marker(wheel: Path) -> None:
    """Each schema/migrations/*.sql file and the py.typed markers are inside the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in schema.all_migrations():
        assert f"schema/migrations/{migration.label}.sql" in names
    assert {"outbox/py.typed", "relay/py.typed", "schema/py.typed"} <= names
    assert not any(name.startswith("tests/") for name in names)


def test_installed_wheel_prints_the_schema(wheel: Path, tmp_path: Path) -> None:
    """`schema show` from the unpacked wheel (not the source tree) prints every migration."""
    zipfile.ZipFile(wheel).extractall(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = (
        "import schema, sys; sys.stderr.write(schema.__file__); from relay.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "schema", "show"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stderr.startswith(str(tmp_path))
    for migration in schema.all_migrations():
        assert f"-- {migration.label}" in result.stdout
    assert 'CREATE TABLE "public"."outbox_events"' in result.stdout
