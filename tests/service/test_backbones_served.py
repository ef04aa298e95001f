"""The service builds whatever backbone the model card names: switching the dog model from ResNet18
to EfficientNet-Lite0 re-embeds the gallery, and identify, verify and explain work on it."""

from __future__ import annotations

from pathlib import Path

from apps import READ, AppRunner, build_artifact, make_models_dir, make_settings
from imagegen import jpeg

from training.artifact import ModelCard, export_artifact, load_artifact
from training.fusion import Branch, fused_from


def test_switching_to_an_efficientnet_lite_model_reembeds_and_serves_it(
    database_url: str,
    tmp_path: Path,
    artifacts,
    runner: AppRunner,  # noqa: ANN001
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    client = runner.start(make_settings(database_url, tmp_path, models, reembed_batch_size=4))
    made = {}
    for individual in range(800, 804):
        files = [("images", (f"{s}.jpg", jpeg(individual, s), "image/jpeg")) for s in range(2)]
        data = {"species": "dog", "external_id": f"d{individual}"}
        response = client.post("/enroll", data=data, files=files)
        assert response.status_code == 201, response.text
        made[individual] = response.json()["individual"]["id"]
    assert client.get("/species/dog", headers=READ).json()["architecture"] == "resnet18-gap-linear-bn"

    make_models_dir(tmp_path, artifacts, dog="dog_lite")
    assert client.post("/species/dog/reload").status_code == 202
    assert client.app.state.runtime.reembedder.wait("dog", timeout=120)
    species = client.get("/species/dog", headers=READ).json()
    assert species["status"] == "ready", species
    assert species["architecture"] == "efficientnet_lite0-gap-linear-bn" and species["index_size"] == 8

    for individual, individual_id in made.items():
        answer = client.post(
            "/identify", data={"species": "dog"}, files={"image": jpeg(individual, 5)}, headers=READ
        ).json()
        assert answer["model_version"] == species["model_version"]
        assert answer["candidates"][0]["individual_id"] == individual_id
    verify = client.post(
        "/verify",
        data={"species": "dog", "individual_id": made[801]},
        files={"image": jpeg(801, 7)},
        headers=READ,
    )
    assert verify.status_code == 200 and verify.json()["similarity"] > 0
    explained = client.post(
        "/explain?format=json",
        data={"species": "dog", "individual_id": made[802]},
        files={"image": jpeg(802, 7)},
        headers=READ,
    )
    assert explained.status_code == 200, explained.text
    body = explained.json()
    assert body["height"] == body["width"] == 64 and max(map(max, body["heatmap"])) > 0


def test_a_fused_model_is_one_artifact_the_service_serves(
    database_url: str,
    tmp_path: Path,
    artifacts,
    runner: AppRunner,  # noqa: ANN001
) -> None:
    small = build_artifact(
        tmp_path / "small", "dog", seed=5, input_size=(48, 48), backbone="efficientnet_lite0"
    )
    parts = [load_artifact(artifacts["dog"]), load_artifact(small)]
    branches = [
        Branch(p.card.architecture, p.card.embedding_dim, p.card.preprocess, w, p.card.model_version)
        for p, w in zip(parts, (0.7, 0.3), strict=True)
    ]
    model = fused_from([(p.model, b) for p, b in zip(parts, branches, strict=True)])  # type: ignore[misc]
    card = ModelCard(
        species="dog",
        embedding_dim=model.embedding_dim,
        preprocess=model.preprocess,
        architecture=model.architecture,
        threshold=parts[0].card.threshold,
        fusion=branches,
    )
    fused = export_artifact(model, card, tmp_path / "fused")
    client = runner.start(
        make_settings(database_url, tmp_path, make_models_dir(tmp_path, {"fused": fused}, dog="fused"))
    )
    species = client.get("/species/dog", headers=READ).json()
    assert species["architecture"] == "fusion-concat" and species["embedding_dim"] == 1024
    made = {}
    for individual in range(810, 814):
        files = [("images", (f"{s}.jpg", jpeg(individual, s), "image/jpeg")) for s in range(2)]
        response = client.post(
            "/enroll", data={"species": "dog", "external_id": f"f{individual}"}, files=files
        )
        assert response.status_code == 201, response.text
        made[individual] = response.json()["individual"]["id"]
    for individual, individual_id in made.items():
        answer = client.post(
            "/identify", data={"species": "dog"}, files={"image": jpeg(individual, 5)}, headers=READ
        ).json()
        assert answer["candidates"][0]["individual_id"] == individual_id
    explained = client.post(
        "/explain?format=json",
        data={"species": "dog", "individual_id": made[811]},
        files={"image": jpeg(811, 7)},
        headers=READ,
    )
    assert explained.status_code == 200, explained.text
    assert max(map(max, explained.json()["heatmap"])) > 0
