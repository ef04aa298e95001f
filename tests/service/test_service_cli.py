"""The ``animalid`` command: its parser, ``migrate``, and the demo (gallery enrolled once, curl printed)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from apps import AppRunner, make_models_dir, make_settings
from imagegen import jpeg
from ports import free_port
from sqlalchemy import create_engine, inspect

from service import cli, demo

REPO = Path(__file__).resolve().parents[2]


def subcommands(parser) -> set[str]:  # noqa: ANN001
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(action.choices)


def test_parser_has_the_service_commands_and_the_training_ones() -> None:
    parser = cli.build_parser()
    names = subcommands(parser)
    assert {"serve", "migrate", "demo"} <= names
    assert {"train", "evaluate", "export", "gradcam"} <= names  # training.cli.add_commands exists now
    for name in ("serve", "migrate", "demo"):
        args = parser.parse_args([name])
        assert callable(args.func)


def test_parser_works_without_training_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "training.cli", None)  # as if the module did not exist
    assert subcommands(cli.build_parser()) == {
        "serve",
        "migrate",
        "demo",
        "enroll",
        "identify",
        "gallery",
        "finetune",
        "worker",
    }


def test_migrate_creates_the_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    url = f"sqlite:///{tmp_path / 'sub' / 'animalid.db'}"
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("ANIMALID_DATABASE_URL", url)
    monkeypatch.setenv("ANIMALID_AUTH_DISABLED", "true")
    assert cli.main(["migrate"]) == 0
    assert "migrated to head" in capsys.readouterr().out
    engine = create_engine(url)
    assert {"individuals", "images", "embeddings", "alembic_version"} <= set(
        inspect(engine).get_table_names()
    )
    engine.dispose()
    assert cli.main(["migrate"]) == 0  # idempotent


def make_gallery(root: Path) -> tuple[Path, Path]:
    gallery, queries = root / "gallery", root / "queries"
    for individual in (1, 2, 3):
        folder = gallery / f"dog-{individual}"
        folder.mkdir(parents=True)
        for shot in (0, 1):
            (folder / f"{shot}.jpg").write_bytes(jpeg(individual, shot))
    (gallery / "notes.txt").write_text("ignored")
    queries.mkdir()
    (queries / "dog-2.jpg").write_bytes(jpeg(2, 5))
    return gallery, queries


def test_demo_enrolls_the_gallery_once(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path], runner: AppRunner
) -> None:
    gallery, _ = make_gallery(tmp_path)
    settings = make_settings(database_url, tmp_path, make_models_dir(tmp_path, artifacts, dog="dog"))
    summaries = []
    for _ in range(2):  # a restart enrolls nothing twice
        client = runner.start(
            settings, on_startup=lambda rt: summaries.append(demo.enroll_gallery(rt, gallery))
        )
        runner.stop(client)
    assert summaries[0] == demo.GallerySummary(species="dog", individuals=3, images_added=6, images_present=0)
    assert summaries[1] == demo.GallerySummary(species="dog", individuals=3, images_added=0, images_present=6)
    client = runner.start(settings)
    listed = client.get("/individuals").json()
    assert sorted(item["external_id"] for item in listed["data"]) == ["dog-1", "dog-2", "dog-3"]


def test_curl_command_is_ready_to_run() -> None:
    url = make_settings("sqlite://", Path("/"), Path("/"), host="0.0.0.0", port=8123).api_url
    command = demo.curl_command(url, "dog", Path("/data/queries/my dog.jpg"))
    assert shlex.split(command) == [
        "curl", "-s", "-F", "species=dog", "-F", "image=@/data/queries/my dog.jpg", "http://127.0.0.1:8123/identify",
    ]  # fmt: skip


def test_demo_command_serves_and_its_curl_identifies(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    gallery, queries = make_gallery(tmp_path)
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")}
    env.update({"ANIMALID_CPU_THREADS": "1", "PYTHONPATH": str(REPO)})
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "demo", "--port", str(port), "--data-dir", str(tmp_path / "d"),
         "--models-dir", str(models), "--gallery-dir", str(gallery), "--queries-dir", str(queries)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while not any(line.strip().startswith("curl ") for line in output):
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(output)
            output.append(line)
            assert time.monotonic() < deadline, "".join(output)
        text = "".join(output)
        assert "authentication is DISABLED" in text
        assert "3 dog individuals, 6 photos enrolled now" in text
        curl = shlex.split(next(line for line in output if line.strip().startswith("curl ")))
        url = curl[-1]
        fields = dict(item.split("=", 1) for item in curl if "=" in item and not item.startswith("http"))
        image = Path(fields["image"].lstrip("@"))
        assert image == queries / "dog-2.jpg"
        while True:  # the curl line is printed just before uvicorn binds the port
            try:
                response = httpx.post(
                    url, data={"species": fields["species"]}, files={"image": image.read_bytes()}
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert response.status_code == 200, response.text
        assert response.json()["decision"] == "match"
        assert response.json()["best"]["external_id"] == "dog-2"
    finally:
        process.terminate()
        process.wait(30)


def test_demo_without_a_model_says_so(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    code = cli.main(["demo", "--models-dir", str(tmp_path / "none"), "--data-dir", str(tmp_path / "d")])
    assert code == 2
    assert re.search(r"no demo model found", capsys.readouterr().err)


def test_cpu_threads_reach_the_worker_threads_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    cli.limit_threads(make_settings("sqlite://", tmp_path, tmp_path, cpu_threads=1))
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    cli.limit_threads(make_settings("sqlite://", tmp_path, tmp_path, cpu_threads=1))
    assert os.environ["OMP_NUM_THREADS"] == "3", "an explicit OpenMP setting wins"


def test_without_cpu_threads_the_environment_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cli.limit_threads(make_settings("sqlite://", tmp_path, tmp_path, cpu_threads=None))
    assert "OMP_NUM_THREADS" not in os.environ
