"""A user's mistakes end ``animalid`` commands with one line and a non-zero status, never a traceback;
``animalid serve`` migrates the embedded SQLite database itself and says what to run on Postgres."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from apps import ADMIN_KEY, READ_KEY, make_models_dir
from databases import postgres_schema
from ports import free_port

from service import cli
from service.db import migrate

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing answers HTTP there


def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in [k for k in os.environ if k.startswith("ANIMALID_")]:
        monkeypatch.delenv(name)


def mistakes(tmp: Path) -> dict[str, list[str]]:
    photo = sorted((REPO / "service" / "demo" / "queries").glob("*.jpg"))[0]
    return {
        "missing dataset": ["train", "--dataset", f"{tmp / 'nope'}:dog", "--out-dir", str(tmp / "runs")],
        "bad config value": ["train", "--dataset", f"{tmp}:dog", "--loss", "hinge", "--out-dir", str(tmp)],
        "missing artifact": ["evaluate", str(tmp / "none"), "--out", str(tmp / "report")],
        "missing run": ["export", str(tmp / "no-run")],
        "unreachable API": ["identify", "--species", "dog", str(photo), "--url", UNREACHABLE],
        "missing photo folder": ["enroll", str(tmp / "nope"), "--species", "dog", "--url", UNREACHABLE],
        "missing photo": ["identify", "--species", "dog", str(tmp / "nope.jpg"), "--url", UNREACHABLE],
        "unreachable database": ["migrate"],
    }


@pytest.mark.parametrize("case", list(mistakes(Path("/"))))
def test_a_user_mistake_is_one_line_and_exit_status_2(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env(tmp_path, monkeypatch)
    monkeypatch.setenv("ANIMALID_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:9/none")
    assert cli.main(mistakes(tmp_path)[case]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.match(r"animalid \w+: error: \S", err), err
    if case == "unreachable API":  # the photo exists: the error is the API's, not the file's
        assert "cannot reach the API" in err, err


def test_the_console_command_prints_no_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *mistakes(tmp_path)["missing dataset"]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == f"animalid train: error: {tmp_path / 'nope'}: no such manifest or folder"


def commands_help() -> dict[str, str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: " ".join(command.format_help().split()) for name, command in sub.choices.items()}


def test_train_help_shows_each_default_once() -> None:
    text = commands_help()["train"]
    assert "(default: 'run')" in text and "(default: 30)" in text and "(default: 'fast')" in text


@pytest.mark.parametrize("command", list(commands_help()))
def test_no_help_prints_a_default_twice(command: str) -> None:
    text = commands_help()[command]
    assert not re.search(r"\(default: [^)]*\) \(default:", text), "a default printed twice"
    # "'fast' (default) or 'study' (default: 'fast')": the option's text names it, the formatter adds it
    assert not re.search(r"\(default\)[^()]*\(default", text), "a default printed twice"
    assert "(default: None)" not in text


def test_serve_migrates_the_embedded_sqlite_database_itself(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")} | {
        "PYTHONPATH": str(REPO),
        "ANIMALID_MODELS_DIR": str(models),
        "ANIMALID_API_KEYS": f"{READ_KEY}:read,{ADMIN_KEY}:admin",
        "ANIMALID_CPU_THREADS": "1",
        "ANIMALID_PORT": str(port),
    }
    assert not (tmp_path / "var").exists()  # the default database ./var/animalid.db does not exist yet
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready")
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.2)
        assert (tmp_path / "var" / "animalid.db").is_file()
    finally:
        process.terminate()
        process.wait(60)


@pytest.mark.postgres
def test_serve_on_an_unmigrated_postgres_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env(tmp_path, monkeypatch)
    with postgres_schema() as url:
        monkeypatch.setenv("ANIMALID_DATABASE_URL", url)
        monkeypatch.setenv("ANIMALID_AUTH_DISABLED", "true")
        assert cli.main(["serve", "--port", str(free_port())]) == 2
        head = migrate.head_revision(url)
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"animalid serve: error: the database schema is at revision none, this code needs {head}: "
        "run `animalid migrate` (with the same ANIMALID_DATABASE_URL) first"
    ]
