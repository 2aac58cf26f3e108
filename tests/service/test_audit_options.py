"""Audit options at submission (issue 17, points 1, 2 and 7): every option typed and bounded by one schema, by the
server's settings and by the audited data, so a worker never meets an option it cannot run. A bad option is a
400 (the web form: a message on its field) that names it, and no audit is created."""
import pytest
from django.test import Client

from audit_service.audits.models import Audit

pytestmark = pytest.mark.django_db

# each input the issue found accepted (or answered with a 500), and what the API now answers
ISSUE_INPUTS = {
    "an SAE batch the trainer buffers forever": (
        {"sae": {"batch_size": 1000000000000}},
        "sae.batch_size: must be at most 16384 on this server (AUDIT_MAX_SAE_BATCH_SIZE), got 1000000000000"),
    "deletion curves a billion steps long": (
        {"faithfulness_steps": 1000000000},
        "faithfulness_steps: must be at most 100 on this server (AUDIT_MAX_FAITHFULNESS_STEPS), got 1000000000"),
    "a billion SAE latents": (
        {"sae": {"n_latents": 10 ** 9}},
        "sae.n_latents: must be at most 65536 on this server (AUDIT_MAX_SAE_LATENTS), got 1000000000"),
    "a billion references per latent": (
        {"n_references": 10 ** 9},
        "n_references: must be at most 128 on this server (AUDIT_MAX_REFERENCES), got 1000000000"),
    "a config that is a string": ("text", "config must be a JSON object of options, got 'text'"),
    "a config that is a number": (7, "config must be a JSON object of options, got 7"),
    "a config that is an empty list": ([], "config must be a JSON object of options, got a list"),
    "SAE options that are a number": ({"sae": 5}, "sae: must be a JSON object of options, got 5"),
    "a fractional SAE batch": ({"sae": {"batch_size": 1.5}}, "sae.batch_size: must be an integer, got 1.5"),
    "a seed numpy cannot take": (
        {"seed": 10 ** 30}, "seed: must be at most 4294967295, got 1000000000000000000000000000000"),
    "'no' for a boolean": ({"causal": "no"}, "causal: must be true or false, got 'no'"),
    "a word for a number": ({"batch_size": "abc"}, "batch_size: must be an integer, got 'abc'"),
}


def submit(client, registered, config, **more):
    body = {"project": registered["model"].project_id, "clip_model": registered["model"].id,
            "probe": registered["probe"].id, "dataset": registered["dataset"].id, "config": config, **more}
    return client.post("/api/v1/audits/", body, format="json")


@pytest.mark.parametrize("config, message", ISSUE_INPUTS.values(), ids=ISSUE_INPUTS.keys())
def test_it_refuses_each_option_the_issue_found_with_a_400_naming_it(client_for, registered, sent, config,
                                                                     message):
    response = submit(client_for("member"), registered, config)
    assert (response.status_code, response.json()) == (400, {"config": [message]})
    assert not Audit.objects.exists() and sent == []


def test_it_refuses_an_sae_batch_larger_than_the_sae_training_vectors(client_for, registered, sent):
    # a CLS model: one training vector per image; the registered dataset has 32 images
    response = submit(client_for("member"), registered, {"sae": {"batch_size": 33}})
    assert response.status_code == 400
    assert response.json()["config"] == ["sae.batch_size: must be at most 32 (the SAE's training vectors: 32 "
                                         "images of dataset 'lesions'), got 33"]
    assert not Audit.objects.exists()
    assert submit(client_for("member"), registered, {"sae": {"batch_size": 32}}).status_code == 201
    # the default (256) is more than there are too: a bound from the data holds for what a user asks
    assert submit(client_for("member"), registered, {}).status_code == 201
    assert Audit.objects.latest("id").config["sae"]["batch_size"] == 256


def test_it_refuses_more_deletion_steps_than_the_sae_has_latents(client_for, registered, sent):
    response = submit(client_for("member"), registered, {"sae": {"n_latents": 16}, "faithfulness_steps": 17})
    assert response.status_code == 400
    assert response.json()["config"] == ["faithfulness_steps: must be at most 16 (sae.n_latents: a step deletes "
                                         "one latent), got 17"]
    assert not Audit.objects.exists()


def test_it_refuses_an_sae_whose_training_outgrows_a_workers_memory(client_for, registered, sent, settings):
    settings.WORKER_TASK_MEMORY_MB = 128
    response = submit(client_for("member"), registered, {"sae": {"n_latents": 65536, "batch_size": 32}})
    assert response.status_code == 400
    # 2 x 65536 x 48 weights with their gradients and Adam's moments, and a batch of 32 through the SAE
    assert response.json()["config"] == [
        "sae: training the SAE (65536 latents on 48-wide activations, batches of 32) takes about 161 MiB with "
        "Adam's states, more than a worker's 128 MiB per task (WORKER_TASK_MEMORY_MB); lower sae.n_latents or "
        "sae.batch_size"]
    assert not Audit.objects.exists()
    settings.WORKER_TASK_MEMORY_MB = 256
    assert submit(client_for("member"), registered, {"sae": {"n_latents": 65536, "batch_size": 32}}).status_code \
        == 201


def test_an_operator_sets_the_bounds_in_settings(client_for, registered, sent, settings):
    settings.AUDIT_MAX_SAE_LATENTS = 64
    response = submit(client_for("member"), registered, {"sae": {"n_latents": 65, "k": 65}})
    assert response.status_code == 400
    assert response.json()["config"] == [
        "sae.n_latents: must be at most 64 on this server (AUDIT_MAX_SAE_LATENTS), got 65; "
        "sae.k: must be at most 64 on this server (AUDIT_MAX_SAE_LATENTS), got 65"]


def test_references_and_deletion_images_beyond_the_dataset_are_stored_as_its_image_count(client_for, registered,
                                                                                         sent):
    response = submit(client_for("member"), registered, {"n_references": 100, "faithfulness_max_images": 1000})
    assert response.status_code == 201
    config = Audit.objects.get().config
    assert (config["n_references"], config["faithfulness_max_images"]) == (32, 32)
    assert response.json()["config"]["n_references"] == 32


def test_the_openapi_schema_describes_config_as_the_options_with_their_bounds(client_for, settings):
    schema = Client().get("/api/v1/schema/?format=json").json()
    config = schema["components"]["schemas"]["AuditRequest"]["properties"]["config"]
    assert config["type"] == "object" and config["additionalProperties"] is False
    options = config["properties"]
    assert options["causal"]["type"] == "boolean"
    assert options["sae"]["type"] == "object"
    assert options["sae"]["properties"]["n_latents"]["maximum"] == settings.AUDIT_MAX_SAE_LATENTS
    assert options["sae"]["properties"]["batch_size"]["maximum"] == settings.AUDIT_MAX_SAE_BATCH_SIZE
    assert options["seed"]["maximum"] == 2 ** 32 - 1
    assert options["layer"]["readOnly"] is True


# --------------------------------------------------------------------------- the web form

@pytest.fixture
def audit_form(registered):
    return {"clip_model": registered["model"].pk, "probe": registered["probe"].pk,
            "dataset": registered["dataset"].pk, "causal": "on"}


def test_the_audit_form_shows_a_refused_option_on_the_options_field(users, project, audit_form, sent):
    client = Client()
    client.force_login(users["member"])
    for options, message in (('{"sae": 5}', "sae: must be a JSON object of options, got 5"),
                             ('{"causal": "no"}', "causal: must be true or false, got 'no'"),
                             ('{"faithfulness_steps": 1000000000}', "faithfulness_steps: must be at most 100 on this "
                                                                    "server (AUDIT_MAX_FAITHFULNESS_STEPS), got "
                                                                    "1000000000")):
        page = client.post(f"/projects/{project.pk}/audits/new/", {**audit_form, "options": options})
        assert page.status_code == 200 and page.context["form"].errors["options"] == [message]
    assert not Audit.objects.exists()


def test_the_audit_form_shows_a_refused_sae_size_on_its_own_field(users, project, audit_form, sent):
    client = Client()
    client.force_login(users["member"])
    page = client.post(f"/projects/{project.pk}/audits/new/", {**audit_form, "n_latents": 10 ** 9})
    assert page.status_code == 200
    assert page.context["form"].errors == {
        "n_latents": ["sae.n_latents: must be at most 65536 on this server (AUDIT_MAX_SAE_LATENTS), got 1000000000"]}
    page = client.post(f"/projects/{project.pk}/audits/new/", {**audit_form, "k": 0})
    assert page.context["form"].errors == {"k": ["sae.k: must be at least 1, got 0"]}
    assert not Audit.objects.exists()
