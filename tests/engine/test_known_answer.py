"""A hand-made audit whose every number is known: a probe that reads one latent's direction.

The model is a real OpenCLIP ViT whose final LayerNorm is removed and whose
projection is the identity, so the image embedding is the CLS residual stream
``h``. The SAE's dictionary is orthonormal, and the probe's melanoma score is
``alpha * D_j . h + b``. Then ``R_j = alpha * z_j`` on every image, every other
latent has zero relevance, ablating j sets the score to ``b`` and inserting
``m * D_j`` raises it by ``alpha * m``.
"""
import copy

import pytest
import torch
from torch import nn

from workers.engine import labelling
from workers.engine.data import TensorImages
from workers.engine.heads import LinearProbe
from workers.engine.hooks import capture_residual
from workers.engine.pipeline import run_audit
from workers.engine.sae import TopKSAE
from workers.engine.tiny import TINY_VIT, tiny_clip

from .conftest import build_audit_config

CLASSES = ["nevus", "melanoma"]
J = 2  # the planted latent
ALPHA = 3.0


@pytest.fixture
def case(tmp_path):
    cfg = copy.deepcopy(TINY_VIT)
    cfg["embed_dim"] = cfg["vision_cfg"]["width"]
    bundle = tiny_clip(0, config=cfg)
    visual = bundle.model.visual
    visual.ln_post = nn.Identity()
    with torch.no_grad():
        visual.proj.copy_(torch.eye(visual.proj.shape[0]))
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(40, 3, 32, 32, generator=gen)
    labels = torch.tensor([0] * 20 + [1] * 20)
    images[20:, :, :8, :8] += 3.0  # melanoma images carry a bright patch: the planted concept
    with capture_residual(visual, -1) as store, torch.no_grad():
        bundle.model.encode_image(images)
    h = store["h"][:, 0]
    d = h.shape[1]
    # orthonormal dictionary whose latent J points from nevus towards melanoma
    seed = torch.randn(6, d, generator=gen)
    seed[J] = h[labels == 1].mean(0) - h[labels == 0].mean(0)
    q, _ = torch.linalg.qr(torch.cat([seed[J:J + 1], seed[:J], seed[J + 1:]]).T)
    q = q.T  # rows orthonormal, row 0 is the planted direction
    if q[0] @ seed[J] < 0:
        q[0] = -q[0]
    q = torch.cat([q[1:J + 1], q[:1], q[J + 1:]])  # put it at index J
    sae = TopKSAE(d, 6, 6)
    with torch.no_grad():
        sae.W_enc.copy_(q)
        sae.W_dec.copy_(q.T)
    z = torch.relu(h @ q.T)
    m = z[labels == 1, J].mean()
    bias = -0.2 * ALPHA * float(m)
    probe = LinearProbe(ALPHA * q[J:J + 1], torch.tensor([bias]), CLASSES, normalization="none")
    return dict(bundle=bundle, images=images, labels=labels, h=h, z=z, sae=sae, probe=probe, bias=bias, m=m,
                tmp=tmp_path)


def _fake_alignment(sem, vocab):
    """The random text tower means nothing, so fix what each latent means: J is a ruler, the rest melanoma."""
    a = torch.zeros(sem.shape[0], len(vocab.concepts))
    a[:, vocab.index["melanoma"]] = 0.3
    a[J] = 0.0
    a[J, vocab.index["a ruler"]] = 0.3
    return a


def _audit(case, monkeypatch, **overrides):
    monkeypatch.setattr(labelling, "alignment", _fake_alignment)
    config = build_audit_config(expected_concepts={"melanoma": ["melanoma"], "nevus": ["nevus"]},
                                artifact_vocabulary=("a ruler",), faithfulness_max_images=20,
                                faithfulness_steps=3, flag_min_share=0.05,
                                # 20 images a class are too few to split on a latent that fires on all of them: the
                                # flag stands on the probe leaning on it where zero-shot does not
                                flag_without_harm=True, **overrides)
    dataset = TensorImages(case["images"], case["labels"], CLASSES)
    return run_audit(config, case["bundle"], case["probe"], dataset, sae=case["sae"], workdir=case["tmp"] / "w")


def test_only_the_read_latent_carries_the_probes_relevance(case, monkeypatch):
    result = _audit(case, monkeypatch)
    top = result.relevance["probe"]["melanoma"]["top"]
    assert top[0]["latent"] == J
    assert top[0]["share"] == pytest.approx(1.0, abs=1e-5)
    assert top[0]["mean_relevance"] == pytest.approx(ALPHA * float(case["m"]), rel=1e-5)
    assert all(abs(t["mean_relevance"]) < 1e-5 for t in top[1:])
    # for nevus the same latent is evidence against: no positive relevance, no share
    assert result.relevance["probe"]["nevus"]["total_positive_relevance"] < 1e-5


def test_the_read_latent_is_the_one_probe_flag(case, monkeypatch):
    result = _audit(case, monkeypatch)
    flags = [f for f in result.flags if f["head"] == "probe"]
    assert [(f["class_name"], f["latent"], f["rank"], f["label"], f["category"]) for f in flags] == \
        [("melanoma", J, 1, "a ruler", "dataset_artifact")]
    assert flags[0]["share"] == pytest.approx(1.0, abs=1e-5)
    assert flags[0]["probe_share"] == pytest.approx(1.0, abs=1e-5)
    # its top images are melanoma images ordered by z_J
    z = case["z"][:, J]
    expected = sorted(range(20, 40), key=lambda i: -float(z[i]))[:8]
    assert [t["image"] for t in flags[0]["top_images"]] == [f"image-{i:06d}" for i in expected]


def test_ablation_and_insertion_flip_exactly_the_images_they_must(case, monkeypatch):
    result = _audit(case, monkeypatch)
    flag = next(f for f in result.flags if f["head"] == "probe")
    z, labels, bias, m = case["z"][:, J], case["labels"], case["bias"], float(case["m"])
    y = ALPHA * (case["h"] @ case["sae"].W_enc[J]) + bias  # the probe's melanoma score
    own = labels == 1
    before = y[own] > 0
    # ablation: active images fall to the bias (negative): every one predicted melanoma flips
    after = torch.where(z[own] > 0, torch.full_like(y[own], bias), y[own]) > 0
    assert flag["causal"]["ablation_images"] == 20
    assert flag["causal"]["ablation_flips"] == int((before != after).sum()) > 0
    assert flag["causal"]["accuracy_before"] == pytest.approx(float(before.float().mean()))
    assert flag["causal"]["accuracy_after"] == pytest.approx(float(after.float().mean()))
    # insertion: nevus images gain alpha * m
    inserted = (y[~own] <= 0) & (y[~own] + ALPHA * m > 0)
    assert flag["causal"]["insertion_images"] == 20
    assert flag["causal"]["insertion_amount"] == pytest.approx(m, rel=1e-5)
    assert flag["causal"]["insertion_flips_to_class"] == int(inserted.sum()) > 0
    # removing J flips melanoma predictions; removing latents of similar mass (which the probe does not read)
    # flips none
    assert flag["causal"]["flip_rate"] > 0 and flag["causal"]["baseline_flip_rate"] == 0.0
    # nevi with J active that the probe calls melanoma: removing J fixes every one, the baseline none ...
    called = (z[~own] > 0) & (y[~own] > 0)
    assert flag["causal"]["others_called_before"] == flag["causal"]["others_fixed"] == int(called.sum()) == 3
    assert flag["causal"]["baseline_fixed"] == 0 and flag["causal"]["baseline_fix_rate"] == 0.0
    # ... yet 3 of 3 is too few images to be beyond the baseline at z >= 3 (against a rate of 1/3: z = 2.45)
    assert flag["causal"]["beyond_baseline"] is False
    # ... but with J active on every melanoma image there is no image without it to measure harm on
    assert flag["harm"]["measured"] is False
    assert flag["confirmation"]["status"] == "relied_on_no_harm" and flag["causal"]["confirmed"] is False


def test_deleting_by_act_grad_removes_the_read_latent_first(case, monkeypatch):
    result = _audit(case, monkeypatch)
    curves = result.faithfulness["probe"]["melanoma"]
    z, bias = case["z"][20:, J], case["bias"]
    y = ALPHA * (case["h"][20:] @ case["sae"].W_enc[J]) + bias
    assert curves["act_grad"]["curve"][0] == pytest.approx(float(y.mean()), rel=1e-4)
    assert curves["act_grad"]["curve"][1] == pytest.approx(float((y - ALPHA * z).mean()), rel=1e-4)
    assert curves["act_grad"]["auc"] <= curves["random"]["auc"] + 1e-6
    assert curves["act_grad"]["auc"] <= curves["energy"]["auc"] + 1e-6


def test_with_a_probe_that_reads_nothing_no_probe_flag_is_raised(case, monkeypatch):
    case["probe"] = LinearProbe(torch.zeros(1, case["h"].shape[1]), torch.tensor([0.1]), CLASSES, "none")
    result = _audit(case, monkeypatch)
    assert [f for f in result.flags if f["head"] == "probe"] == []
    assert result.comparison["melanoma"]["probe_share"] == 0.0
