"""run_audit end to end on a tiny model: the result is plain data, progress is reported, stages resume."""
import json

import pytest
import torch

from workers.engine import AuditCancelled, AuditResult, EngineError, LinearProbe, run_audit
from workers.engine.data import TensorImages
from workers.engine.stages import ENGINE_STAGES

from .conftest import CLASSES, assert_same_answer, build_audit_config


def test_an_audit_returns_a_json_ready_result_with_every_section(tiny, probe, dataset, tmp_path):
    result = run_audit(build_audit_config(), tiny, probe, dataset, workdir=tmp_path)
    data = json.loads(result.to_json())
    assert AuditResult.from_dict(data).to_dict() == data
    assert data["classes"] == CLASSES
    assert data["dataset"] == {"n_images": 48, "per_class": {"nevus": 24, "melanoma": 24}}
    assert set(data["accuracy"]) == {"probe", "zero_shot"}
    assert len(data["latents"]) == data["sae"]["n_latents"]
    assert 0 < data["sae"]["fvu"] < 1 and data["sae"]["mean_l0"] <= data["sae"]["k"]
    assert set(data["faithfulness"]["probe"]["melanoma"]) == {"act_grad", "logit_lens", "act_logit_lens",
                                                              "energy", "random"}
    assert len(data["faithfulness"]["probe"]["melanoma"]["act_grad"]["curve"]) == 6
    for flag in data["flags"]:
        assert flag["causal"]["ablation_images"] == 24
        assert flag["label"] is not None and flag["category"]
    shares = [t["share"] for t in data["relevance"]["probe"]["melanoma"]["top"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-5
    assert (tmp_path / "relevance.npz").is_file() and (tmp_path / "sae" / "sae.safetensors").is_file()


def test_progress_walks_the_stages_in_order(tiny, probe, dataset, tmp_path):
    seen = []
    run_audit(build_audit_config(), tiny, probe, dataset, workdir=tmp_path,
              progress=lambda stage, done, total: seen.append((stage, done, total)))
    order = list(dict.fromkeys(s for s, _, _ in seen))
    assert order == list(ENGINE_STAGES)
    for stage in ENGINE_STAGES:
        fractions = [d / t for s, d, t in seen if s == stage]
        assert fractions[-1] == 1.0
        assert all(0 <= f <= 1 for f in fractions)


def test_a_cancelled_audit_stops_and_a_rerun_resumes_from_the_finished_stages(tiny, probe, dataset, tmp_path):
    def cancel_in_attribution(stage, done, total):
        if stage == "attribute" and done > 0 and done < total:
            raise AuditCancelled()

    with pytest.raises(AuditCancelled):
        run_audit(build_audit_config(batch_size=16), tiny, probe, dataset, workdir=tmp_path,
                  progress=cancel_in_attribution)
    seen = []
    result = run_audit(build_audit_config(batch_size=16), tiny, probe, dataset, workdir=tmp_path,
                       progress=lambda s, d, t: seen.append((s, d, t)))
    # extraction and SAE training were finished before the cancel: the re-run reports no work in them
    assert [(d, t) for s, d, t in seen if s == "extract"] == [(0, 1), (1, 1)]
    assert [(d, t) for s, d, t in seen if s == "train_sae"] == [(0, 1), (1, 1)]
    fresh = run_audit(build_audit_config(batch_size=16), tiny, probe, dataset, workdir=tmp_path / "fresh")
    assert result.flags == fresh.flags
    assert result.relevance == fresh.relevance


def test_a_probe_of_another_width_is_refused_before_any_work(tiny, dataset, tmp_path):
    wide = LinearProbe(torch.randn(2, 64), torch.zeros(2), CLASSES)
    with pytest.raises(EngineError, match="reads 64-dimensional embeddings but the model produces 32"):
        run_audit(build_audit_config(), tiny, wide, dataset, workdir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_dataset_with_classes_the_probe_lacks_is_refused(tiny, probe, tmp_path):
    odd = TensorImages(torch.randn(4, 3, 32, 32), [0, 1, 2, 2], ["nevus", "melanoma", "wart"])
    with pytest.raises(EngineError, match="classes the probe does not know: wart"):
        run_audit(build_audit_config(), tiny, probe, odd, workdir=tmp_path)


def test_audits_are_deterministic_for_a_seed(tiny, probe, dataset, tmp_path):
    a = run_audit(build_audit_config(), tiny, probe, dataset, workdir=tmp_path / "a")
    b = run_audit(build_audit_config(), tiny, probe, dataset, workdir=tmp_path / "b")
    assert a.flags == b.flags and a.sae == b.sae and a.faithfulness == b.faithfulness


def test_a_spatial_audit_at_an_inner_layer_runs(tiny, probe, dataset, tmp_path):
    result = run_audit(build_audit_config(layer=-2, token="spatial", sae={"tokens_per_image": 4}), tiny, probe,
                       dataset, workdir=tmp_path)
    assert result.model["token"] == "spatial" and result.model["layer"] == -2
    assert result.relevance["probe"]["melanoma"]["top"]


def test_latents_can_be_labelled_by_a_second_semantic_model(tiny, probe, dataset, tmp_path):
    from workers.engine.tiny import tiny_clip

    other = tiny_clip(7)
    own = run_audit(build_audit_config(), tiny, probe, dataset, workdir=tmp_path / "own")
    second = run_audit(build_audit_config(), tiny, probe, dataset, workdir=tmp_path / "second",
                       semantic_model=other)
    # same SAE, same references, same relevance; only what the latents are said to mean changes
    assert [l["references"] for l in own.latents] == [l["references"] for l in second.latents]
    strip = lambda rel: {h: {c: [(t["latent"], t["share"]) for t in v["top"]] for c, v in r.items()}
                         for h, r in rel.items()}
    assert strip(own.relevance) == strip(second.relevance)
    assert [l["clarity"] for l in own.latents] != [l["clarity"] for l in second.latents]
    # (random text towers describe nothing confidently: the labels are "unlabelled", the closest concepts differ)
    assert [l["closest_concept"] for l in own.latents] != [l["closest_concept"] for l in second.latents]


def test_asking_for_a_gpu_on_a_machine_without_one_says_so(tiny, probe, dataset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="no CUDA GPU"):
        run_audit(build_audit_config(device="cuda"), tiny, probe, dataset, workdir=tmp_path)


@pytest.mark.parametrize("token,layer,patches", [("cls", -1, 0), ("cls", -1, 4), ("spatial", -2, 0)])
def test_one_shard_and_many_shards_give_the_same_answer(tiny, probe, dataset, tmp_path, token, layer, patches):
    # a random tiny model harms nothing measurably: flags that stand on share alone give the merge something to show
    config = build_audit_config(token=token, layer=layer, batch_size=16,
                                sae={"tokens_per_image": 4, "patch_tokens": patches}, flag_without_harm=True)
    one = run_audit(config, tiny, probe, dataset, workdir=tmp_path / "one")
    many = run_audit(config, tiny, probe, dataset, workdir=tmp_path / "many", shard_size=7)  # 7 shards, last of 6
    assert len(list((tmp_path / "many" / "activations").glob("acts-*.npy"))) == 7
    # the cls audit has flags to compare (with patch tokens the random model's few flags find no majority: the
    # dropped ones and every relevance table are still compared)
    assert one.flags or token == "spatial" or patches
    assert_same_answer(one.to_dict(), many.to_dict())
    # sae.patch_tokens: a CLS SAE trains on each image's CLS token and that many of its patch tokens
    assert one.sae["n_train_vectors"] == many.sae["n_train_vectors"] == 48 * (1 + patches if token == "cls" else 4)


def test_the_sae_can_be_trained_on_other_unlabelled_images(tiny, probe, dataset, tmp_path):
    unlabelled = TensorImages(torch.randn(80, 3, 32, 32, generator=torch.Generator().manual_seed(9)), [0] * 80,
                              ["unlabelled"])
    seen = []
    result = run_audit(build_audit_config(), tiny, probe, dataset, workdir=tmp_path, sae_images=unlabelled,
                       progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert result.sae["n_train_vectors"] == 80
    assert result.dataset["n_images"] == 48  # attribution still runs on the audited images
    assert (tmp_path / "sae_activations" / "store.json").is_file()
    fractions = [d / t for s, d, t in seen if s == "train_sae"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # extraction and training share the stage
    own = run_audit(build_audit_config(), tiny, probe, dataset, workdir=tmp_path / "own")
    assert own.sae["n_train_vectors"] == 48
