import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_folder_dataset, write_manifest
from tiny_runs import tiny_config

import training.train as train
from training.artifact import ArtifactError, ModelCard, load_artifact
from training.config import DatasetConfig, build_config
from training.pipeline import export_run, held_out, stranger_dataset, trained_on
from training.preprocess import PreprocessSpec
from training.train import (
    DistInfo,
    epoch_batches,
    fit,
    gather_rows,
    load_checkpoint,
    prepare_data,
    process_share,
    split_dataset,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def animals(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("animals"), n_individuals=14, n_images=6, size=32)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_short_training_lowers_the_loss_and_logs_one_json_line_per_epoch(tmp_path, animals, capsys):
    run = fit(tiny_config(tmp_path, {"goat": animals}, epochs=4))
    losses = _losses(run)
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"epoch", "loss", "lr", "val_top1_goat", "images_per_s"} <= set(printed[-1])
    assert (run / "config.yaml").is_file()


def test_margin_warmup_ramps_the_margin_from_zero_and_logs_it(tmp_path, animals):
    run = fit(tiny_config(tmp_path, {"goat": animals}, epochs=4, margin=0.2, margin_warmup_epochs=2))
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [line["margin"] for line in lines] == [0.0, 0.1, 0.2, 0.2]


def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path, animals):
    full = fit(tiny_config(tmp_path / "a", {"goat": animals}, epochs=2))
    part = tiny_config(tmp_path / "b", {"goat": animals}, epochs=1)
    fit(part)
    resumed = fit(replace(part, epochs=2), resume=True)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(resumed / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 1
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6, msg=key)
    assert _losses(full) == _losses(resumed)


def test_export_then_load_gives_identical_embeddings_and_transfer_starts_from_it(tmp_path, animals):
    from training.pipeline import export_run

    run = fit(tiny_config(tmp_path, {"goat": animals}, epochs=1))
    (artifact,) = export_run(run)
    loaded = load_artifact(artifact)
    state = load_checkpoint(run / "checkpoint.pt")
    x = torch.randn(4, 3, 32, 32)
    from training.model import EmbeddingNet

    reference = EmbeddingNet(embedding_dim=32)
    reference.load_state_dict(state["model"])
    reference.eval()
    torch.testing.assert_close(loaded.model.embed(x), reference.embed(x), rtol=0, atol=0)
    card = loaded.card
    assert card.threshold is not None and card.threshold_far == 1e-3
    assert {"top1", "top1_std", "map", "eer"} <= set(card.metrics)
    assert (artifact / "report" / "report.md").is_file()
    assert card.metrics["calibration_individuals"] == 2
    assert card.warnings and "calibrated on 2 validation individuals, fewer than 30" in card.warnings[0]
    # transfer: a new run initialised from the artifact starts from its weights, with a new head
    config = tiny_config(
        tmp_path / "transfer", {"sheep": animals}, init_from=str(artifact), freeze_stages=2, epochs=1
    )
    from training.train import build_train_module

    data = prepare_data(config, PreprocessSpec(input_size=(32, 32)))
    module, frozen = build_train_module(config, data)
    assert frozen == ["stem", "layer1"]
    torch.testing.assert_close(
        module.model.state_dict()["backbone.layer3.0.conv1.weight"],
        state["model"]["backbone.layer3.0.conv1.weight"],
    )
    assert not module.model.backbone.layer1[0].conv1.weight.requires_grad
    assert module.model.backbone.layer2[0].conv1.weight.requires_grad


def test_an_artifact_preprocessed_differently_is_refused(tmp_path, animals):
    from training.pipeline import export_run

    (artifact,) = export_run(fit(tiny_config(tmp_path, {"goat": animals}, epochs=1)))
    card_path = artifact / "model_card.json"
    card = json.loads(card_path.read_text())
    card["preprocessing_version"] = "0"
    card_path.write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="preprocessing version '0'"):
        load_artifact(artifact)
    assert not list(artifact.glob("*.partial")), "the weights were renamed into place"
    assert (artifact / "model.safetensors").stat().st_mode & 0o777 == 0o644, "readable by the service's user"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda_keeps_the_optimizer_state_on_the_gpu(tmp_path, animals):
    part = tiny_config(tmp_path, {"goat": animals}, epochs=1, device="cuda")
    fit(part)
    resumed = fit(replace(part, epochs=2), resume=True)  # a CPU momentum buffer fails the first step
    assert load_checkpoint(resumed / "checkpoint.pt")["epoch"] == 1


def test_joint_batches_follow_species_weights(tmp_path, animals):
    small = make_folder_dataset(tmp_path / "small", n_individuals=6, n_images=4, size=32, seed=3)
    config = tiny_config(
        tmp_path, {"big": animals, "small": small}, batch_size=20, val_fraction=0.2, test_fraction=0.2
    )
    config = replace(config, datasets=(replace(config.datasets[0], weight=3.0), config.datasets[1]))
    data = prepare_data(config, PreprocessSpec(input_size=(32, 32)))
    batches = epoch_batches(data, config, epoch=0)
    for batch in batches:
        counts = np.bincount(batch[:, 0], minlength=2)
        assert counts.tolist() == [15, 5]  # 3:1 of 20
    assert len(batches) == (len(data[0].labels) + len(data[1].labels)) // 20
    assert epoch_batches(data, config, 0)[0].tolist() == batches[0].tolist()  # seeded
    run = fit(replace(config, epochs=1))
    from training.pipeline import export_run

    exported = export_run(run)
    assert sorted(p.name for p in exported) == ["big", "small"]
    assert load_artifact(exported[1]).card.species == "small"


def test_a_joint_batch_gathers_each_row_from_its_own_species_in_the_batch_order():
    dogs = torch.arange(10).view(5, 2)
    cows = 100 + torch.arange(6).view(3, 2)
    batch = np.array([[1, 2], [0, 4], [0, 0], [1, 0], [0, 4]])
    rows = gather_rows([dogs, cows], batch)
    assert rows.tolist() == [[104, 105], [8, 9], [0, 1], [100, 101], [8, 9]]


@pytest.mark.parametrize(
    "weights,unit,expected",
    [
        ([3.0, 1.0], 1, [15, 5]),
        ([0.99, 0.01], 1, [18, 2]),  # at least two images of the small species, and still 20 in all
        ([0.97, 0.03], 4, [16, 4]),  # at least one whole chunk of K = 4, and still 20 in all
        ([1.0, 1.0, 1.0], 1, [6, 7, 7]),  # ties of the remainder go to the later datasets
    ],
)
def test_joint_batches_have_the_configured_size_whatever_the_weights(tmp_path, weights, unit, expected):
    sets = {
        f"s{i}": make_folder_dataset(tmp_path / f"s{i}", 6, 4, size=32, seed=i) for i in range(len(weights))
    }
    config = tiny_config(tmp_path, sets, batch_size=20, samples_per_individual=0 if unit == 1 else unit)
    config = replace(
        config, datasets=tuple(replace(d, weight=w) for d, w in zip(config.datasets, weights, strict=True))
    )
    data = prepare_data(config, PreprocessSpec(input_size=(32, 32)))
    for batch in epoch_batches(data, config, 0):
        assert np.bincount(batch[:, 0], minlength=len(weights)).tolist() == expected


def test_triplet_training_uses_p_by_k_batches(tmp_path, animals):
    config = tiny_config(tmp_path, {"goat": animals}, loss="triplet", samples_per_individual=4, epochs=2)
    data = prepare_data(config, PreprocessSpec(input_size=(32, 32)))
    batch = epoch_batches(data, config, 0)[0]
    labels = data[0].labels[batch[:, 1]].tolist()
    assert all(labels.count(label) == 4 for label in set(labels))
    run = fit(config)
    assert len(_losses(run)) == 2


def test_each_process_gets_whole_individuals_of_a_p_by_k_batch(tmp_path, animals):
    config = tiny_config(tmp_path, {"goat": animals}, loss="triplet", samples_per_individual=4)
    data = prepare_data(config, PreprocessSpec(input_size=(32, 32)))
    for batch in epoch_batches(data, config, 0):
        parts = [batch[process_share(len(batch), DistInfo(rank, 2))] for rank in range(2)]
        assert np.concatenate(parts).tolist() == batch.tolist()  # every row once, in order
        for part in parts:
            labels = data[0].labels[part[:, 1]].tolist()
            assert len(part) == 8 and all(labels.count(label) == 4 for label in labels)


def test_joint_p_by_k_batches_share_out_whole_individuals(tmp_path, animals):
    small = make_folder_dataset(tmp_path / "small", n_individuals=6, n_images=4, size=32, seed=3)
    config = tiny_config(
        tmp_path, {"big": animals, "small": small}, loss="triplet", samples_per_individual=4, batch_size=24
    )
    config = replace(config, datasets=(replace(config.datasets[0], weight=3.0), config.datasets[1]))
    data = prepare_data(config, PreprocessSpec(input_size=(32, 32)))
    for batch in epoch_batches(data, config, 0):
        # 3:1 of 24 is 18:6; in whole chunks of 4 it is 16:8 (the rounding favours the small share)
        assert np.bincount(batch[:, 0], minlength=2).tolist() == [16, 8]
        for s, d in enumerate(data):
            labels = d.labels[batch[batch[:, 0] == s, 1]].tolist()
            assert all(labels.count(label) % 4 == 0 for label in labels)


def test_torchrun_two_processes_with_gloo(tmp_path, animals):
    config = tiny_config(tmp_path, {"goat": animals}, epochs=1)
    config.run_dir.mkdir(parents=True)
    yaml_path = tmp_path / "config.yaml"
    config.save(yaml_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "training.cli",
            "train",
            "--config",
            str(yaml_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    exported = [line["artifact"] for line in lines if "artifact" in line]
    records = [line for line in lines if "artifact" not in line]
    assert len(records) == 1  # only rank 0 logs; fit() also checked that both replicas hold equal weights
    assert len(exported) == 1, "one process exports; two writing one folder can break its checksum"
    assert load_artifact(exported[0]).card.species == "goat"
    assert (config.run_dir / "checkpoint.pt").is_file()
    # The batch is divided between the processes, not resampled: the logged loss (mean over both)
    # stays close to a one-process run of the same seed (BatchNorm sees half-batches, so not equal).
    single = fit(replace(config, out_dir=str(tmp_path / "single")))
    assert records[0]["loss"] == pytest.approx(_losses(single)[0], rel=0.1)


def test_evaluation_can_ignore_or_replace_the_group_key(tmp_path, animals):
    from training.pipeline import regrouped

    config = tiny_config(tmp_path, {"cattle": animals})
    config = replace(config, datasets=tuple(replace(d, group_pattern=r"^(\d+)_") for d in config.datasets))
    plain = regrouped(config, None)
    assert [d.group_pattern for d in plain.datasets] == [None]
    assert [d.source for d in plain.datasets] == [d.source for d in config.datasets]
    assert [d.group_pattern for d in regrouped(config, r"^(\w+)_").datasets] == [r"^(\w+)_"]
    assert config.datasets[0].group_pattern == r"^(\d+)_", "the original configuration is untouched"


def test_evaluation_gives_strangers_only_to_their_own_species(tmp_path, animals):
    from training.pipeline import evaluate_artifact, export_run

    strangers = make_folder_dataset(tmp_path / "strangers", n_individuals=3, n_images=4, size=32, seed=5)
    for folder in strangers.iterdir():
        folder.rename(strangers / f"stranger-{folder.name}")
    config = tiny_config(tmp_path, {"goat": animals, "sheep": animals}, epochs=1)
    config = replace(config, strangers=DatasetConfig(source=str(strangers), species="goat"))
    artifacts = {path.name: path for path in export_run(fit(config))}
    for species, expected in (("goat", 12), ("sheep", 0)):
        evaluated = evaluate_artifact(artifacts[species], tmp_path / f"eval-{species}")
        assert evaluated.result.counts["strangers_images"] == expected, species


def test_a_batch_larger_than_the_dataset_trains_on_all_of_it(tmp_path, animals):
    config = tiny_config(tmp_path, {"goat": animals}, batch_size=300)
    data = prepare_data(config, PreprocessSpec(input_size=(32, 32)))
    (batch,) = epoch_batches(data, config, epoch=0)
    assert sorted(batch[:, 1].tolist()) == list(range(len(data[0].labels)))


def test_held_out_finds_its_species_among_joint_datasets_configured_without_one(tmp_path):
    # Manifests carry the species, so a joint configuration need not name it.
    goats, sheep = (
        write_manifest(make_folder_dataset(tmp_path / name, n_individuals=10, n_images=3, size=24), species)
        for name, species in (("goats", "goat"), ("sheep", "sheep"))
    )
    config = build_config({"datasets": [{"source": str(goats)}, {"source": str(sheep)}]})
    for species, ds_cfg in (("goat", config.datasets[0]), ("sheep", config.datasets[1])):
        card = ModelCard(species, 8, PreprocessSpec(), training_config=config.to_dict())
        _, split = split_dataset(config, ds_cfg)
        samples = held_out(card).samples
        assert {s.species for s in samples} == {species}
        assert {s.individual for s in samples} == set(split.test)
    with pytest.raises(ValueError, match="no dataset of species 'cow'"):
        held_out(ModelCard("cow", 8, PreprocessSpec(), training_config=config.to_dict()))


def test_trained_on_reads_every_individual_grouped_as_in_training_and_the_strangers_apart(tmp_path):
    # What a closed-set gallery is built from: training, validation and test individuals alike,
    # the group key (clip) of the training, and the excluded strangers kept for the open set.
    manifest = write_manifest(
        make_folder_dataset(tmp_path / "cows", n_individuals=10, n_images=4, size=24), "cow"
    )
    strangers = "^ind00[01]$"
    config = build_config(
        {
            "datasets": [
                {"source": str(manifest), "group_pattern": r"^(clip\d)_", "exclude_individuals": strangers}
            ],
            "strangers": {"source": str(manifest), "exclude_individuals": "^(?!ind00[01]$)"},
        }
    )
    card = ModelCard("cow", 8, PreprocessSpec(), training_config=config.to_dict())
    dataset, split = trained_on(card)
    assert (
        dataset.individuals
        == sorted([*split.train, *split.val, *split.test])
        == [f"ind{i:03d}" for i in range(2, 10)]
    )
    assert {s.group for s in dataset.samples if s.individual == "ind002"} == {"ind002/clip0", "ind002/clip1"}
    assert trained_on(card, source=manifest)[0].samples == dataset.samples
    found = stranger_dataset(config)
    assert found is not None and found.individuals == ["ind000", "ind001"]
    assert stranger_dataset(replace(config, strangers=None)) is None


def test_few_calibration_individuals_warn_and_the_paper_section_is_for_dogs_only(tmp_path, animals):
    from training.model import EmbeddingNet
    from training.pipeline import MIN_CALIBRATION_INDIVIDUALS, calibration_warnings, evaluate_species

    spec = PreprocessSpec(input_size=(32, 32))
    torch.manual_seed(0)
    model = EmbeddingNet(embedding_dim=32).eval()
    for species in ("dog", "human"):
        config = tiny_config(tmp_path / species, {species: animals})
        (data,) = prepare_data(config, spec)
        out = tmp_path / species / "report"
        evaluation = evaluate_species(model, spec, config, data.val, data.test, None, out, species, {})
        text = evaluation.report.read_text()
        count = len(set(data.val.individuals))
        assert count < MIN_CALIBRATION_INDIVIDUALS
        assert evaluation.metrics()["calibration_individuals"] == count
        warning = f"> **Warning:** the decision threshold was calibrated on {count} validation individuals"
        assert warning in text
        assert ("DogFaceNet paper protocols" in text) == (species == "dog"), species
    assert calibration_warnings(MIN_CALIBRATION_INDIVIDUALS) == []


def test_a_run_from_an_artifact_reads_no_pretrained_weights(tmp_path, animals, monkeypatch):
    """A fine-tune starts from an artifact whose recipe says `pretrained: imagenet`: the ImageNet
    weights (the `[pretrained]` extra, which the image does not install) would be overwritten by
    the artifact's, so they are not read at all."""
    run = fit(tiny_config(tmp_path, {"goat": animals}, epochs=1))
    (artifact,) = export_run(run)
    expected = load_artifact(artifact).model.state_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained weights read for a run that starts from an artifact")

    monkeypatch.setattr(train, "load_pretrained", refuse)
    config = tiny_config(tmp_path / "ft", {"goat": animals}, init_from=str(artifact), pretrained="imagenet")
    model = train.build_model(config)
    for name, value in expected.items():
        torch.testing.assert_close(model.state_dict()[name], value)
