"""API tokens scoped to projects, per-token rate limits, the OpenAPI schema and its docs page, the tokens page;
what the flags and summary endpoints return about measured harm."""
import re

import pytest
from django.test import Client
from rest_framework.test import APIClient

from audit_service.accounts.models import ApiToken
from audit_service.projects.models import Membership, Project, Role

from .results import RULER_SUMMARY, build_result, stored_audit, without_new_keys

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_projects(project, users):
    other = Project.objects.create(name="Radiology")
    Membership.objects.create(project=other, user=users["member"], role=Role.MEMBER)
    return project, other


def test_a_token_scoped_to_one_project_reaches_only_that_project(two_projects, users, registered):
    derm, radio = two_projects
    _, scoped = ApiToken.issue(users["member"], "derm-ci", projects=[derm])
    _, broad = ApiToken.issue(users["member"], "all")
    scoped_client = APIClient(HTTP_AUTHORIZATION=f"Token {scoped}")
    broad_client = APIClient(HTTP_AUTHORIZATION=f"Token {broad}")
    assert [p["name"] for p in scoped_client.get("/api/v1/projects/").json()["results"]] == ["Dermatology"]
    assert {p["name"] for p in broad_client.get("/api/v1/projects/").json()["results"]} == {"Dermatology",
                                                                                           "Radiology"}
    assert scoped_client.get(f"/api/v1/projects/{radio.pk}/").status_code == 404
    assert scoped_client.get(f"/api/v1/models/{registered['model'].pk}/").status_code == 200
    refused = scoped_client.post("/api/v1/datasets/", {"project": radio.pk, "name": "x"}, format="multipart")
    assert refused.status_code in (400, 404)
    assert not radio.datasets.exists()


def test_a_token_cannot_be_scoped_to_someone_elses_project(users, project):
    stranger = Project.objects.create(name="Pathology")
    client = APIClient()
    client.force_authenticate(users["member"])
    response = client.post("/api/v1/tokens/", {"name": "x", "projects": [stranger.pk]}, format="json")
    assert response.status_code == 400 and "not a member" in str(response.json()["projects"])


def test_a_token_over_its_rate_gets_a_clear_429(users, project, settings):
    settings.API_RATE_PER_TOKEN = "3/min"
    _, key = ApiToken.issue(users["member"], "busy")
    _, other = ApiToken.issue(users["member"], "quiet")
    client = APIClient(HTTP_AUTHORIZATION=f"Token {key}")
    assert [client.get("/api/v1/projects/").status_code for _ in range(3)] == [200, 200, 200]
    throttled = client.get("/api/v1/projects/")
    assert throttled.status_code == 429
    assert "throttled" in throttled.json()["detail"] and int(throttled["Retry-After"]) > 0
    assert APIClient(HTTP_AUTHORIZATION=f"Token {other}").get("/api/v1/projects/").status_code == 200  # per token


def test_the_openapi_schema_describes_the_whole_api_and_the_docs_page_works_offline():
    client = Client()
    schema = client.get("/api/v1/schema/?format=json")
    assert schema.status_code == 200
    body = schema.json()
    assert body["openapi"].startswith("3.")
    paths = set(body["paths"])
    for expected in ("/api/v1/projects/", "/api/v1/models/", "/api/v1/probes/", "/api/v1/datasets/",
                     "/api/v1/audits/", "/api/v1/audits/{id}/cancel/", "/api/v1/audits/{id}/summary/",
                     "/api/v1/audits/{audit_pk}/flags/", "/api/v1/audits/{audit_pk}/latents/", "/api/v1/tokens/"):
        assert expected in paths, expected
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', docs.content.decode())
    assert sources and not [s for s in sources if s.startswith("http")]  # assets ship with the project


def test_the_tokens_page_shows_a_new_key_once_and_revokes(users, project):
    client = Client()
    client.force_login(users["member"])
    page = client.post("/tokens/", {"name": "laptop", "projects": [project.pk]})
    key = re.search(r'<pre id="key">([^<]+)</pre>', page.content.decode()).group(1)
    token = ApiToken.objects.get(name="laptop")
    assert list(token.projects.all()) == [project]
    assert APIClient(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").status_code == 200
    assert key not in client.get("/tokens/").content.decode()  # shown once
    client.post(f"/tokens/{token.pk}/revoke/")
    assert APIClient(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").status_code == 401
    assert Client().get("/tokens/").status_code == 302


def test_admins_create_a_token_whose_key_is_shown_once_and_revoke_it(users, project):
    from django.contrib.auth import get_user_model

    admin_user = get_user_model().objects.create_superuser("admin", password="pw-admin")
    client = Client()
    client.force_login(admin_user)
    page = client.post("/admin/accounts/apitoken/add/", {"user": users["member"].pk, "name": "ci",
                                                         "projects": [project.pk]}, follow=True)
    key = re.search(r"(cat_[A-Za-z0-9_\-]+)", page.content.decode()).group(1)
    token = ApiToken.objects.get(name="ci")
    assert token.user == users["member"] and list(token.projects.all()) == [project]
    assert APIClient(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").status_code == 200
    assert key not in client.get(f"/admin/accounts/apitoken/{token.pk}/change/").content.decode()
    client.post("/admin/accounts/apitoken/", {"action": "revoke", "_selected_action": [token.pk]})
    assert APIClient(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").status_code == 401


# --------------------------------------------------------------------------- measured harm and confirmation

def test_flags_carry_measured_harm_confirmation_label_confidence_and_metadata(client_for, project, users,
                                                                             registered):
    audit = stored_audit(project, users["member"], registered)
    client = client_for("viewer")
    flags = {(f["head"], f["class_name"]): f
             for f in client.get(f"/api/v1/audits/{audit.pk}/flags/").json()["results"]}
    ruler = flags[("probe", "melanoma")]
    assert ruler["harm"]["measured"] is True and ruler["harm"]["summary"] == RULER_SUMMARY
    assert ruler["harm"]["probe"]["class_without"]["n"] == 15
    assert ruler["harm"]["probe"]["class_without"]["accuracy"] == pytest.approx(1 / 3)
    assert ruler["harm"]["zero_shot"]["others_with"] == {"n": 16, "called_class": 0.2}
    assert ruler["confirmation"]["status"] == "confirmed" and "fixes 9 of the 13" in ruler["confirmation"]["text"]
    assert ruler["confirmed"] is True
    assert (ruler["label_confidence"], ruler["closest_concept"]) == (0.91, "a ruler")
    assert ruler["metadata_auroc"]["ruler"] == 0.97 and ruler["concept_latents"] == [0, 3]
    unlabelled = flags[("probe", "nevus")]
    assert (unlabelled["label"], unlabelled["closest_concept"], unlabelled["label_confidence"]) == (
        "unlabelled", "hair", 0.12)
    assert unlabelled["confirmation"] == {"status": "relied_on_no_harm", "text": "relied on, no measured harm"}
    # ablation flipped predictions, but without measured harm that no longer confirms a shortcut
    assert unlabelled["causal"]["confirmed"] is True and unlabelled["confirmed"] is False
    assert flags[("zero_shot", "melanoma")]["confirmed"] is False
    assert client.get(f"/api/v1/audits/{audit.pk}/flags/", {"confirmed": "true"}).json()["count"] == 1
    latent = client.get(f"/api/v1/audits/{audit.pk}/latents/1/").json()
    assert (latent["label"], latent["label_confidence"], latent["closest_concept"]) == ("unlabelled", 0.12, "hair")
    assert client_for("outsider").get(f"/api/v1/audits/{audit.pk}/flags/").status_code == 404


def test_a_flag_whose_confirmation_did_not_run_is_neither_confirmed_nor_refuted(client_for, project, users,
                                                                               registered):
    result = build_result()
    result["flags"][0]["confirmation"] = {"status": "not_run", "text": "causal checks were switched off"}
    audit = stored_audit(project, users["member"], registered, result)
    ruler = client_for("viewer").get(f"/api/v1/audits/{audit.pk}/flags/", {"head": "probe",
                                                                           "class_name": "melanoma"}).json()
    assert ruler["results"][0]["confirmed"] is None
    assert ruler["results"][0]["confirmation"]["status"] == "not_run"


def test_the_summary_counts_flags_with_measured_harm_per_class(client_for, project, users, registered):
    audit = stored_audit(project, users["member"], registered)
    body = client_for("viewer").get(f"/api/v1/audits/{audit.pk}/summary/").json()
    assert body["classes"]["melanoma"]["flags_with_measured_harm"] == 1
    assert body["classes"]["nevus"]["flags_with_measured_harm"] == 0
    assert body["classes"]["melanoma"]["confirmed_flags"] == 1 and body["classes"]["nevus"]["confirmed_flags"] == 0
    assert body["sae_dataset"] == {"name": "ISIC archive, unlabelled", "n_images": 5000}
    assert body["slices"]["ruler"]["1"]["n"] == 41
    assert client_for("outsider").get(f"/api/v1/audits/{audit.pk}/summary/").status_code == 404


def test_an_audit_stored_before_harm_was_measured_serves_its_flags_as_before(client_for, project, users,
                                                                            registered):
    audit = stored_audit(project, users["member"], registered, without_new_keys(build_result()))
    client = client_for("viewer")
    flags = {(f["head"], f["class_name"]): f
             for f in client.get(f"/api/v1/audits/{audit.pk}/flags/").json()["results"]}
    ruler = flags[("probe", "melanoma")]
    assert ruler["harm"] is None and ruler["confirmation"] == {"status": "", "text": ""}
    assert (ruler["label_confidence"], ruler["closest_concept"], ruler["metadata_auroc"], ruler["concept_latents"]) \
        == (None, "", {}, [])
    # its engine confirmed a flag when ablation or insertion flipped a prediction; that is what it still says
    assert ruler["confirmed"] is True and flags[("probe", "nevus")]["confirmed"] is True
    summary = client.get(f"/api/v1/audits/{audit.pk}/summary/").json()
    assert summary["classes"]["melanoma"]["flags_with_measured_harm"] == 0
    assert summary["sae_dataset"] is None and summary["slices"] == {}
    assert client.get(f"/api/v1/audits/{audit.pk}/latents/1/").json()["label_confidence"] is None
