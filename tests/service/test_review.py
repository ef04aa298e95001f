"""The review queue: uncertain identify answers kept (opt-in), listed and resolved by an admin,
audited; resolving enrols the photo (confirm, new individual) or nothing (reject)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from apps import ADMIN, READ, AppRunner, make_models_dir, make_settings
from imagegen import jpeg
from test_identify import enroll
from test_open_set_decision import dog_with_table  # noqa: F401  (fixture)

from service.db.repository import Repository


@pytest.fixture
def start(runner: AppRunner, database_url: str, tmp_path: Path, dog_with_table: Path):  # noqa: F811
    """Start an app serving the dog model whose card answers every non-identical photo uncertain."""
    models = make_models_dir(tmp_path, {"dog": dog_with_table}, dog="dog")
    return lambda **overrides: runner.start(
        make_settings(database_url, tmp_path, models, review_fpir=0.1, **overrides)
    )


def test_uncertain_answers_are_kept_and_resolved(start) -> None:  # noqa: ANN001
    client = start(review_queue=True)
    rex = enroll(client, 300)["individual"]
    enroll(client, 301)

    def ask(image: bytes) -> dict:
        response = client.post("/identify", data={"species": "dog"}, files={"image": image}, headers=READ)
        assert response.status_code == 200, response.text
        return response.json()

    assert ask(jpeg(300, 0))["review_id"] is None, "a match is not queued"
    photos = {"confirm": jpeg(300, 7), "new": jpeg(350, 1), "reject": jpeg(351, 1)}
    answers = {key: ask(photo) for key, photo in photos.items()}
    assert all(a["decision"] == "uncertain" and a["review_id"] for a in answers.values())
    ids = {key: a["review_id"] for key, a in answers.items()}

    assert client.get("/review", headers=READ).status_code == 403
    listed = client.get("/review", params={"status": "pending", "species": "dog"}, headers=ADMIN).json()
    assert listed["count"] == 3 and [item["id"] for item in listed["data"]] == list(ids.values())
    first = listed["data"][0]
    assert first["candidates"] == answers["confirm"]["candidates"]
    assert first["similarity"] == answers["confirm"]["candidates"][0]["similarity"]
    assert client.get(f"/review/{ids['confirm']}/image", headers=ADMIN).content == photos["confirm"]

    def resolve(key: str, **body: object) -> dict:
        response = client.post(f"/review/{ids[key]}/resolve", json=body, headers=ADMIN)
        return {**response.json(), "http": response.status_code}

    assert resolve("confirm", action="confirm")["code"] == "invalid_request"
    confirmed = resolve("confirm", action="confirm", individual_id=rex["id"])
    assert (confirmed["http"], confirmed["individual_id"]) == (200, rex["id"])
    images = client.get(f"/individuals/{rex['id']}/images", headers=ADMIN).json()
    assert confirmed["image_id"] in {image["id"] for image in images["data"]} and images["count"] == 3
    again = resolve("confirm", action="reject")
    assert (again["http"], again["code"]) == (409, "review_already_resolved")
    assert client.get(f"/review/{ids['confirm']}/image", headers=ADMIN).status_code == 404

    taken = resolve("new", action="new_individual", external_id=rex["external_id"])
    assert (taken["http"], taken["code"]) == (409, "external_id_conflict")
    created = resolve("new", action="new_individual", external_id="dog-350", name="Newcomer")
    assert (
        created["http"] == 200
        and created["status"] == "new_individual"
        and created["individual_id"] not in (None, rex["id"])
    )
    assert ask(photos["new"])["best"]["external_id"] == "dog-350", "the photo is enrolled to the new dog"

    rejected = resolve("reject", action="reject")
    assert (rejected["http"], rejected["status"], rejected["individual_id"], rejected["image_id"]) == (
        200,
        "rejected",
        None,
        None,
    )
    assert ask(photos["reject"])["candidates"][0]["external_id"] != "dog-351"

    missing = client.post(
        "/review/00000000-0000-4000-8000-000000000000/resolve", json={"action": "reject"}, headers=ADMIN
    )
    assert (missing.status_code, missing.json()["code"]) == (404, "review_not_found")
    left = client.get("/review", params={"status": "pending"}, headers=ADMIN).json()
    assert left["count"] == 1, "only the reject photo asked again is pending"
    with client.app.state.runtime.sessions() as session:
        actions = [(e.action, e.details.get("review")) for e in Repository(session).audit_entries()]
    assert [a for a in actions if a[0].startswith("review_")] == [
        ("review_confirm", ids["confirm"]),
        ("review_new_individual", ids["new"]),
        ("review_reject", ids["reject"]),
    ]


def test_without_the_queue_nothing_is_kept(start) -> None:  # noqa: ANN001
    client = start()
    enroll(client, 300)
    answer = client.post("/identify", data={"species": "dog"}, files={"image": jpeg(300, 7)}).json()
    assert (answer["decision"], answer["review_id"]) == ("uncertain", None)
    assert client.get("/review", params={"status": "pending"}).json()["count"] == 0


def test_one_item_resolved_on_two_replicas_at_once_is_resolved_once(start, backend: str) -> None:  # noqa: ANN001
    """Two admins resolve one kept photo through two API processes at the same moment (each holds its
    own species lock): one resolution wins, the other is refused, and the photo makes one animal."""
    if backend == "sqlite":
        return  # one process per SQLite database
    first, second = start(review_queue=True), start(review_queue=True)
    enroll(first, 300)
    enroll(first, 301)
    for round_ in range(3):
        answer = first.post(
            "/identify", data={"species": "dog"}, files={"image": jpeg(360 + round_, 1)}
        ).json()
        assert answer["decision"] == "uncertain" and answer["review_id"], answer

        def resolve(pair: tuple[object, str], review: str = answer["review_id"]) -> object:
            client, external_id = pair
            return client.post(  # type: ignore[attr-defined]
                f"/review/{review}/resolve",
                json={"action": "new_individual", "external_id": external_id},
                headers=ADMIN,
            )

        names = [f"dog-{round_}-a", f"dog-{round_}-b"]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(resolve, zip((first, second), names, strict=True)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 409], [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 409).json()["code"]
        assert refused in ("review_already_resolved", "review_in_progress")
        found = first.get("/individuals", params={"species": "dog", "limit": 100}, headers=ADMIN).json()
        made = [i["external_id"] for i in found["data"] if i["external_id"] in names]
        assert len(made) == 1, made
