"""The Python client and the ``animalid enroll`` / ``animalid identify`` verbs, against a live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from apps import ADMIN_KEY, READ_KEY, live_server, make_models_dir, make_settings
from databases import provisioned_database
from imagegen import jpeg

from service import cli, folder_enroll
from service.app import create_app
from service.client import AnimalIDClient, ApiError, ClientError
from service.schemas import CandidatePublic, IdentifyResult, SpeciesList


@pytest.fixture
def server(backend: str, tmp_path: Path, artifacts: dict[str, Path]) -> Iterator[str]:
    with provisioned_database(backend, tmp_path) as url:
        settings = make_settings(url, tmp_path, make_models_dir(tmp_path, artifacts, dog="dog"), warmup=False)
        with live_server(create_app(settings)) as base:
            yield base


def photo_folder(root: Path, animals: int = 3, shots: int = 3) -> Path:
    for animal in range(1, animals + 1):
        folder = root / f"dog-{animal}"
        folder.mkdir(parents=True)
        for shot in range(shots):
            (folder / f"{shot}.jpg").write_bytes(jpeg(animal, shot))
    return root


def admin(url: str) -> AnimalIDClient:
    return AnimalIDClient(url, api_key=ADMIN_KEY)


def test_client_enrolls_and_identifies(server: str) -> None:
    with admin(server) as client:
        enrolled = client.enroll("dog", [("a.jpg", jpeg(7, 0)), ("b.jpg", jpeg(7, 1))], external_id="rex")
        assert enrolled.individual_created and [i.created for i in enrolled.images] == [True, True]
        found = client.find_individual("dog", "rex")
        assert found is not None and found.id == enrolled.individual.id
        assert client.image_hashes(found.id) == {i.sha256 for i in enrolled.images}
        assert client.find_individual("dog", "nobody") is None
        result = client.identify("dog", ("q.jpg", jpeg(7, 2)))
        assert result.decision == "match" and result.best is not None and result.best.external_id == "rex"
        with pytest.raises(ApiError) as refused:
            client.identify("cow", ("q.jpg", jpeg(7, 2)))
        assert refused.value.status == 404 and refused.value.code == "species_not_found"
        for path in ("/docs", "/health"):  # an HTML page; JSON of another shape
            with pytest.raises(ClientError, match="did not answer as the AnimalID API does"):
                client._request("GET", path, SpeciesList)


def test_enroll_twice_enrolls_nothing_twice(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = photo_folder(tmp_path / "photos")
    command = ["enroll", str(photos), "--species", "dog", "--url", server, "--api-key", ADMIN_KEY]
    assert cli.main([*command, "--batch-size", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "3 individuals (3 new): 9 photos enrolled now, 0 already enrolled, 0 refused"
    ]
    (photos / "dog-2" / "3.jpg").write_bytes(jpeg(2, 3))  # one new photo since
    assert cli.main([*command, "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "3 individuals (0 new): 1 photos enrolled now, 9 already enrolled, 0 refused"
    ]
    with admin(server) as client:
        for animal, count in (("dog-1", 3), ("dog-2", 4), ("dog-3", 3)):
            individual = client.find_individual("dog", animal)
            assert individual is not None and len(client.image_hashes(individual.id)) == count


def test_an_interrupted_enroll_resumes_where_it_stopped(server: str, tmp_path: Path) -> None:
    plan = folder_enroll.photos_by_individual(photo_folder(tmp_path / "photos"), "dog")
    handled = []

    def interrupt_after_four(done: int) -> None:
        handled.append(done)
        if sum(handled) >= 4:
            raise KeyboardInterrupt

    with admin(server) as client:
        with pytest.raises(KeyboardInterrupt):
            folder_enroll.enroll_folder(client, plan, "dog", 2, interrupt_after_four)
        summary = folder_enroll.enroll_folder(client, plan, "dog", 2)
    # Stopped after dog-1's 3 photos and dog-2's first two (batches of 2): those 5 are not sent again.
    assert (summary.added, summary.already_enrolled, summary.individuals_created) == (4, 5, 1)


def test_refused_photos_are_listed_with_the_reason_and_the_rest_enrolled(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = photo_folder(tmp_path / "photos", animals=2, shots=2)
    (photos / "dog-1" / "notes.jpg").write_text("not a photo")
    (photos / "dog-2" / "empty.png").write_bytes(b"")
    (photos / "dog-2" / "readme.txt").write_text("not an image file name: never sent")
    command = ["enroll", str(photos), "--species", "dog", "--url", server, "--api-key", ADMIN_KEY, "--quiet"]
    assert cli.main(command) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 individuals (2 new): 4 photos enrolled now, 0 already enrolled, 2 refused"
    assert lines[1].startswith(
        f"  refused {photos / 'dog-1' / 'notes.jpg'} (dog-1): unsupported_media_type: "
    )
    assert lines[2].startswith(f"  refused {photos / 'dog-2' / 'empty.png'} (dog-2): image_unreadable: ")


def test_enroll_from_a_manifest_takes_its_species_rows(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo_folder(tmp_path / "photos", animals=2, shots=2)
    (tmp_path / "photos" / "manifest.csv").write_text(
        "path,individual,species\ndog-1/0.jpg,rex,dog\ndog-1/1.jpg,rex,dog\ndog-2/0.jpg,tom,cat\n"
    )
    command = ["enroll", str(tmp_path / "photos" / "manifest.csv"), "--species", "dog", "--quiet"]
    assert cli.main([*command, "--url", server, "--api-key", ADMIN_KEY]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("1 individuals (1 new): 2 photos enrolled now")


def test_a_read_key_cannot_enroll_and_the_run_stops_in_one_line(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = photo_folder(tmp_path / "photos", animals=1, shots=1)
    command = ["enroll", str(photos), "--species", "dog", "--quiet", "--url", server, "--api-key", READ_KEY]
    assert cli.main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("animalid enroll: error: ") and "403" in err[0]


def test_identify_verb_answers_per_photo(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo_folder(tmp_path / "photos", animals=2, shots=2)
    assert cli.main(["enroll", str(tmp_path / "photos"), "--species", "dog", "--url", server,
                     "--api-key", ADMIN_KEY, "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    query, stranger = tmp_path / "query.jpg", tmp_path / "stranger.jpg"
    query.write_bytes(jpeg(2, 7))
    stranger.write_bytes(jpeg(99, 0))
    base = ["identify", "--species", "dog", "--url", server, "--api-key", READ_KEY]
    assert cli.main([*base, str(query), str(stranger)]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith(f"{query}: match dog-2 (")
    assert second.startswith(f"{stranger}: unknown at threshold ")
    assert cli.main([*base, "--json", "--top-k", "1", str(query)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["photo"] == str(query) and answer["best"]["external_id"] == "dog-2"
    assert len(answer["candidates"]) == 1


def test_the_verbs_print_answers_not_request_logs(server: str, tmp_path: Path) -> None:
    """httpx logs each request at INFO; over a progress bar and the answers it reads like trouble."""
    photo_folder(tmp_path / "photos", animals=1, shots=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")} | {
        "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1]),
        "ANIMALID_CLIENT_URL": server,
        "ANIMALID_CLIENT_API_KEY": ADMIN_KEY,
    }
    commands = [
        ["enroll", str(tmp_path / "photos"), "--species", "dog", "--quiet"],
        ["identify", str(tmp_path / "photos" / "dog-1" / "0.jpg"), "--species", "dog"],
    ]
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", *command],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr
    assert done.stdout.startswith(f"{tmp_path / 'photos' / 'dog-1' / '0.jpg'}: match dog-1 (")


def answer(
    decision: str, similarities: list[float], confidence: float | None = None, floor: float | None = None
) -> IdentifyResult:
    candidates = [
        CandidatePublic(
            individual_id=uuid.UUID(int=n),
            external_id=f"dog-{n}",
            name=None,
            similarity=s,
            image_id=uuid.UUID(int=100 + n),
        )
        for n, s in enumerate(similarities, start=1)
    ]
    return IdentifyResult(
        species="dog",
        model_version="dog-0",
        decision=decision,
        threshold=0.785,
        threshold_source="open_set",
        best=candidates[0] if decision == "match" else None,
        candidates=candidates,
        gallery_size=32,
        confidence=confidence,
        min_confidence=floor,
    )


@pytest.mark.parametrize(
    ("decision", "similarities", "confidence", "said", "candidates"),
    [
        ("match", [0.791, 0.436], None, "match dog-1 (0.791)", "dog-1 0.791, dog-2 0.436"),
        ("match", [0.791, 0.436], 0.934, "match dog-1 (0.791, confidence 0.93)", "dog-1 0.791, dog-2 0.436"),
        ("uncertain", [0.769, 0.528], None, "uncertain dog-1 (0.769)", "dog-1 0.769, dog-2 0.528"),
        (
            "uncertain",
            [0.801, 0.797],
            0.412,
            "uncertain dog-1 (0.801, confidence 0.41, below the 0.5 a match needs)",
            "dog-1 0.801, dog-2 0.797",
        ),
        ("unknown", [0.723, 0.536], 0.1, "unknown", "dog-1 0.723, dog-2 0.536"),
        ("unknown", [], None, "unknown", "none"),
    ],
    ids=["match", "match-confidence", "uncertain", "held-back", "unknown", "no-candidates"],
)
def test_identify_prints_the_services_decision(
    decision: str, similarities: list[float], confidence: float | None, said: str, candidates: str
) -> None:
    """An uncertain answer (the demo's queries 60 and 63) was printed as unknown; one held back by the
    minimum match confidence says so."""
    line = cli.identify_line(Path("q.jpg"), answer(decision, similarities, confidence, floor=0.5))
    assert line == f"q.jpg: {said} at threshold 0.785; candidates: {candidates}"
