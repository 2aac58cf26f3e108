"""Model registration refuses, before anything is built, a config of the wrong types or over the size limits in
settings, and a layer/token pair whose relevance is zero by construction (issue 17, points 4 and 8)."""
import json
import re

import open_clip
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from audit_service.registry.models import ClipModel
from workers.engine.tiny import tiny_config

from .conftest import upload

pytestmark = pytest.mark.django_db

CLS_POOLED_SPATIAL = ("layer {layer} with token 'spatial': the last block's spatial tokens do not reach a CLS-pooled "
                      "model's output (pool_type 'tok': the image embedding is the CLS token), so every relevance "
                      "would be zero and the audit could flag nothing; pick layer {earlier} or token cls")
AVG_POOLED_CLS = ("layer -1 with token 'cls': the last block's CLS token does not reach an average-pooled model's "
                  "output (pool_type 'avg': the image embedding is the mean of the patch tokens), so every relevance "
                  "would be zero and the audit could flag nothing; pick layer -2 or token spatial")


def files_under(root) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def builds(monkeypatch) -> list:
    """Every model open_clip is asked to build; the refusals under test must leave this empty."""
    built = []

    def refuse_to_build(name, *args, **kwargs):
        built.append(name)
        raise RuntimeError("this test expects the config to be refused before any model is built")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse_to_build)
    return built


def register(client, project, assets, config=None, **extra):
    data = {"project": project.id, "name": "m", "checkpoint": upload(assets["checkpoint"]),
            "model_config": json.dumps(config) if config is not None else upload(assets["config"]), **extra}
    return client.post("/api/v1/models/", data, format="multipart")


# --------------------------------------------------------------------------- sizes (point 4)

def test_an_absurd_config_with_a_text_tower_is_refused_by_its_size_before_anything_is_built(
        client_for, project, assets, media, builds):
    config = {"embed_dim": 1024,
              "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 4096, "layers": 128, "head_width": 64},
              "text_cfg": {"context_length": 77, "vocab_size": 10_000_000, "width": 4096, "heads": 64, "layers": 128}}

    response = register(client_for("member"), project, assets, config)

    assert response.status_code == 400
    message = response.json()["model_config"][0]
    # by hand: a block of width 4096 holds 201,379,840 weights; 128 of them in each tower, 25,784,786,944 in the
    # image tower and 66,741,137,408 in the text tower (its 10**7 x 4096 token embedding), plus the logit scale;
    # memory counts the 77 x 77 attention mask too
    assert message == ("the model has 92.5 billion parameters (about 370.1 GB in float32), over the limit of 5.0 "
                       "billion (MODEL_MAX_PARAMETERS); check the config's widths, layers and vocab_size")
    assert builds == []
    assert ClipModel.objects.count() == 0 and files_under(media) == []


def test_twenty_thousand_layers_are_refused_naming_the_setting_before_anything_is_built(
        client_for, project, assets, builds):
    response = register(client_for("member"), project, assets, tiny_config(layers=20_000, width=16, head_width=8))

    assert response.status_code == 400
    assert response.json()["model_config"] == [
        "vision_cfg.layers is 20000, over the limit of 128 (MODEL_MAX_LAYERS); this service does not build models "
        "that large"]
    assert builds == []


@pytest.mark.parametrize("setting,value,message", [
    ("MODEL_MAX_PARAMETERS", 1_000_000, "the model has 1,664,049 parameters (about 6.7 MB in float32), over the "
                                        "limit of 1,000,000 (MODEL_MAX_PARAMETERS)"),
    ("MODEL_MAX_WIDTH", 40, "vision_cfg.width is 48, over the limit of 40 (MODEL_MAX_WIDTH)"),
    ("MODEL_MAX_IMAGE_SIZE", 16, "vision_cfg.image_size is 32, over the limit of 16 (MODEL_MAX_IMAGE_SIZE)"),
    ("MODEL_MAX_PATCHES", 8, "the patches per image (image_size / patch_size, squared) is 16, over the limit of 8 "
                             "(MODEL_MAX_PATCHES)"),
    ("MODEL_MAX_CONTEXT_LENGTH", 8, "text_cfg.context_length is 16, over the limit of 8 (MODEL_MAX_CONTEXT_LENGTH)"),
])
def test_each_size_limit_is_read_from_settings_and_named(client_for, project, assets, settings, builds, setting,
                                                         value, message):
    setattr(settings, setting, value)

    response = register(client_for("member"), project, assets)

    assert response.status_code == 400
    assert response.json()["model_config"][0].startswith(message)
    assert builds == [] and ClipModel.objects.count() == 0


def test_a_built_in_architecture_over_a_limit_is_refused_on_the_architecture(client_for, project, settings):
    settings.MODEL_MAX_LAYERS = 6

    response = client_for("member").post("/api/v1/models/", {
        "project": project.id, "name": "b32", "architecture": "ViT-B-32", "pretrained_tag": "laion2b_s34b_b79k"})

    assert response.status_code == 400
    assert response.json()["architecture"][0].startswith("vision_cfg.layers is 12, over the limit of 6 "
                                                         "(MODEL_MAX_LAYERS)")


def test_a_checkpoint_far_smaller_than_its_config_is_refused_before_the_model_is_built(
        client_for, project, assets, media, builds):
    large = tiny_config(width=1024, layers=24, head_width=64, image_size=224, patch_size=14)

    response = register(client_for("member"), project, assets, large)

    assert response.status_code == 400
    message = response.json()["checkpoint"][0]
    # by hand: 24 blocks of width 1024 (8,399,872 weights each) and the rest of the image tower make 202,500,096;
    # the tiny text tower 1,595,360; the logit scale 1
    assert re.fullmatch(r"checkpoint tiny-vit\.safetensors holds 1,664,049 weights but custom-[0-9a-f]{12} has "
                        r"204,095,457 parameters, so it was not saved from this model\. Check that the architecture "
                        r"\(or model config\) is the one the checkpoint was saved from\.", message), message
    assert builds == []
    assert ClipModel.objects.count() == 0 and files_under(media) == []


@pytest.mark.parametrize("section,key,value,message", [
    ("vision_cfg", "width", "abc", 'vision_cfg.width must be a whole number of at least 1, got "abc"'),
    ("vision_cfg", "layers", 3.0, "vision_cfg.layers must be a whole number of at least 1, got 3.0"),
    ("vision_cfg", "mlp_ratio", "2", 'vision_cfg.mlp_ratio must be a positive number, got "2"'),
    ("vision_cfg", "image_size", [32], "vision_cfg.image_size must be a whole number of at least 1 or a "
                                       "[height, width] pair of them, got list"),
    ("vision_cfg", "no_ln_pre", "no", 'vision_cfg.no_ln_pre must be true or false, got "no"'),
    ("vision_cfg", "widht", 48, "vision_cfg.widht is not an open_clip setting; remove it or check its spelling"),
    ("vision_cfg", "head_width", 64, "vision_cfg.width (48) must split into heads of vision_cfg.head_width (64)"),
    ("vision_cfg", "pool_type", "none", "vision_cfg.pool_type must be one of 'tok', 'avg', got \"none\""),
    ("text_cfg", "heads", 2.5, "text_cfg.heads must be a whole number of at least 1, got 2.5"),
    ("text_cfg", "vocab_size", -1, "text_cfg.vocab_size must be a whole number of at least 1, got -1"),
    ("text_cfg", "hf_model_name", "bert-base-uncased", "text_cfg.hf_model_name would download a Hugging Face text "
                                                       "tower"),
    ("", "embed_dim", "32", 'embed_dim must be a whole number of at least 1, got "32"'),
])
def test_a_config_value_of_the_wrong_type_is_refused_naming_its_key(client_for, project, assets, builds, section,
                                                                   key, value, message):
    config = tiny_config()
    (config[section] if section else config)[key] = value

    response = register(client_for("member"), project, assets, config)

    assert response.status_code == 400
    assert response.json()["model_config"][0].startswith(f"model config: {message}")
    assert builds == [] and ClipModel.objects.count() == 0


@pytest.mark.parametrize("text,message", [
    ("[" * 20_000 + "]" * 20_000, "the JSON is nested too deeply"),
    (json.dumps({**tiny_config(), "note": "x" * 200_000}), "bytes of JSON; at most 100000 are accepted here"),
])
def test_a_config_too_deep_or_too_large_to_be_one_is_refused_before_it_is_parsed(client_for, project, assets, builds,
                                                                                 text, message):
    response = client_for("member").post("/api/v1/models/", {
        "project": project.id, "name": "m", "model_config": SimpleUploadedFile("c.json", text.encode()),
        "checkpoint": upload(assets["checkpoint"])}, format="multipart")

    assert response.status_code == 400
    assert message in response.json()["model_config"][0]
    assert builds == [] and ClipModel.objects.count() == 0


def test_the_web_form_refuses_a_config_nested_too_deeply_on_its_field(users, project, assets, builds):
    client = Client()
    client.force_login(users["member"])

    page = client.post(f"/projects/{project.pk}/models/new/", {
        "name": "deep", "layer": -1, "token": "cls", "checkpoint": upload(assets["checkpoint"]),
        "model_config": SimpleUploadedFile("c.json", ("[" * 20_000 + "]" * 20_000).encode())})

    assert page.status_code == 200
    field = re.search(rb'id="field-model_config".*?</div>', page.content, re.S).group(0)
    assert b"nested too deeply" in field
    assert builds == [] and ClipModel.objects.count() == 0


def test_the_web_form_shows_a_size_refusal_on_the_config_field(users, project, assets, tmp_path, builds):
    client = Client()
    client.force_login(users["member"])
    config = tmp_path / "deep.json"
    config.write_text(json.dumps(tiny_config(layers=20_000, width=16, head_width=8)))

    page = client.post(f"/projects/{project.pk}/models/new/", {
        "name": "deep", "layer": -1, "token": "cls", "model_config": upload(config),
        "checkpoint": upload(assets["checkpoint"])})

    assert page.status_code == 200
    field = re.search(rb'id="field-model_config".*?</div>', page.content, re.S).group(0)
    assert b"errorlist" in field and b"over the limit of 128 (MODEL_MAX_LAYERS)" in field
    assert builds == [] and ClipModel.objects.count() == 0


# --------------------------------------------------------------------------- layer and token (point 8)

@pytest.mark.parametrize("layer,earlier", [(-1, "-2"), (2, "1")])
def test_spatial_tokens_after_the_last_block_of_a_cls_pooled_model_are_refused_saying_what_to_pick(
        client_for, project, assets, media, layer, earlier):
    response = register(client_for("member"), project, assets, layer=layer, token="spatial")

    assert response.status_code == 400
    assert response.json()["layer"] == [CLS_POOLED_SPATIAL.format(layer=layer, earlier=earlier)]
    assert ClipModel.objects.count() == 0 and files_under(media) == []
    assert register(client_for("member"), project, assets, layer=-2, token="spatial").status_code == 201


def test_the_cls_token_after_the_last_block_of_an_average_pooled_model_is_refused(client_for, project, assets):
    client = client_for("member")
    average_pooled = tiny_config(pool_type="avg")  # the same weights: pooling has no parameters

    refused = register(client, project, assets, average_pooled, layer=-1, token="cls")
    assert refused.status_code == 400
    assert refused.json()["layer"] == [AVG_POOLED_CLS]

    spatial = register(client, project, assets, average_pooled, layer=-1, token="spatial")
    assert spatial.status_code == 201, spatial.json()
    assert (spatial.json()["layer"], spatial.json()["token"]) == (-1, "spatial")


def test_a_built_in_average_pooled_architecture_is_refused_with_its_defaults(client_for, project):
    response = client_for("member").post("/api/v1/models/", {
        "project": project.id, "name": "clipa", "architecture": "ViT-L-14-CLIPA", "pretrained_tag": "datacomp1b"})

    assert response.status_code == 400
    assert response.json()["layer"] == [AVG_POOLED_CLS]


def test_the_web_form_shows_the_layer_refusal_on_the_layer_field(users, project, assets):
    client = Client()
    client.force_login(users["member"])

    page = client.post(f"/projects/{project.pk}/models/new/", {
        "name": "tiny", "layer": -1, "token": "spatial", "model_config": upload(assets["config"]),
        "checkpoint": upload(assets["checkpoint"])})

    assert page.status_code == 200
    field = re.search(rb'id="field-layer".*?</div>', page.content, re.S).group(0)
    assert b"errorlist" in field and b"pick layer -2 or token cls" in field
    assert ClipModel.objects.count() == 0
