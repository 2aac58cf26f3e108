"""Every endpoint x (owner, member, viewer, outsider, anonymous): outsiders see nothing, viewers cannot write."""
import pytest

from audit_service.audits.models import Flag, Review
from audit_service.audits.services import create_audit
from audit_service.audits.models import store_result

from .conftest import FAST_AUDIT, upload

pytestmark = pytest.mark.django_db

PERSONAS = ["owner", "member", "viewer", "outsider", None]


@pytest.fixture
def world(project, users, registered):
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    finished = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                            probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    finished.mark_running("extract", 1.0)
    store_result(finished, {
        "classes": ["melanoma", "nevus"], "dataset": {"per_class": {"melanoma": 16, "nevus": 16}},
        "accuracy": {h: {"per_class": {"melanoma": 1.0, "nevus": 1.0}} for h in ("probe", "zero_shot")},
        "comparison": {c: {"probe_share": 0.5, "zero_shot_share": 0.1} for c in ("melanoma", "nevus")},
        "sae": {}, "timings": {}, "environment": {},
        "latents": [{"latent": 0, "label": "a ruler", "label_source": "artifact", "label_category": "dataset_artifact",
                     "label_alignment": 0.2, "clarity": 0.9, "frequency": 0.3, "max_activation": 1.0, "references": [],
                     "expected_alignment": {}}],
        "flags": [{"head": "probe", "class_name": "melanoma", "latent": 0, "rank": 1, "share": 0.5,
                   "mean_relevance": 0.2, "label": "a ruler", "label_source": "artifact",
                   "category": "dataset_artifact", "label_alignment": 0.2, "expected_alignment": -0.1,
                   "clarity": 0.9, "probe_share": 0.5, "zero_shot_share": 0.1, "references": [],
                   "top_images": [], "causal": {"confirmed": True}}]}, {})
    flag = Flag.objects.get(audit=finished)
    return {"project": project, "audit": audit, "finished": finished, "flag": flag, **registered}


def _reads(w):
    p, a, f = w["project"].id, w["finished"].id, w["flag"].id
    return [f"/api/v1/projects/{p}/", f"/api/v1/projects/{p}/members/", f"/api/v1/models/{w['model'].id}/",
            f"/api/v1/probes/{w['probe'].id}/", f"/api/v1/datasets/{w['dataset'].id}/", f"/api/v1/audits/{a}/",
            f"/api/v1/audits/{a}/summary/", f"/api/v1/audits/{a}/flags/", f"/api/v1/audits/{a}/flags/{f}/",
            f"/api/v1/audits/{a}/flags/{f}/reviews/", f"/api/v1/audits/{a}/latents/",
            f"/api/v1/audits/{a}/latents/0/", f"/api/v1/audits/{a}/download/json/",
            f"/api/v1/audits/{a}/download/latents.csv/", f"/api/v1/audits/{a}/download/flags.csv/"]


def _lists(w):
    return ["/api/v1/projects/", "/api/v1/models/", "/api/v1/probes/", "/api/v1/datasets/", "/api/v1/audits/"]


@pytest.mark.parametrize("persona", PERSONAS)
def test_reading_every_endpoint(world, client_for, persona):
    client = client_for(persona)
    for url in _reads(world):
        status = client.get(url).status_code
        expected = {None: 401, "outsider": 404}.get(persona, 200)
        assert status == expected, (persona, url, status)
    for url in _lists(world):
        response = client.get(url)
        if persona is None:
            assert response.status_code == 401 and response["WWW-Authenticate"] == "Token"
        else:
            assert response.status_code == 200
            count = response.json()["count"]
            assert (count == 0) == (persona == "outsider"), (persona, url, count)


def _writes(w, assets):
    """(method, url, data, format, role needed) for every endpoint that changes something."""
    p, a, q, f = w["project"].id, w["audit"].id, w["finished"].id, w["flag"].id
    model = {"project": p, "name": "m2", "model_config": upload(assets["config"]),
             "checkpoint": upload(assets["checkpoint"])}
    probe = {"project": p, "clip_model": w["model"].id, "name": "p2", "file": upload(assets["probe"])}
    dataset = {"project": p, "name": "d2", "archive": upload(assets["dataset"])}
    audit = {"project": p, "clip_model": w["model"].id, "probe": w["probe"].id, "dataset": w["dataset"].id,
             "config": {"sae": {"steps": 10}}}
    return [
        ("patch", f"/api/v1/projects/{p}/", {"description": "x"}, "json", "owner"),
        ("post", f"/api/v1/projects/{p}/members/", {"username": "outsider", "role": "viewer"}, "json", "owner"),
        ("post", "/api/v1/models/", model, "multipart", "member"),
        ("post", "/api/v1/probes/", probe, "multipart", "member"),
        ("post", "/api/v1/datasets/", dataset, "multipart", "member"),
        ("post", "/api/v1/audits/", audit, "json", "member"),
        ("post", f"/api/v1/audits/{a}/cancel/", {}, "json", "member"),
        ("post", f"/api/v1/audits/{q}/flags/{f}/reviews/", {"verdict": "benign", "note": "ok"}, "json", "member"),
    ]


RANK = {"viewer": 0, "member": 1, "owner": 2}


@pytest.mark.parametrize("persona", PERSONAS)
def test_writing_every_endpoint(world, client_for, persona, assets, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = False
    world["project"].max_concurrent_audits = 10
    world["project"].save()
    for method, url, data, fmt, needed in _writes(world, assets):
        client = client_for(persona)
        status = getattr(client, method)(url, data, format=fmt).status_code
        if persona is None:
            expected = {401}
        elif persona == "outsider":
            expected = {404}
        elif RANK[persona] >= RANK[needed]:
            expected = {200, 201}
        else:
            expected = {403}
        assert status in expected, (persona, method, url, status)
    reviews = Review.objects.count()
    assert reviews == (1 if persona in ("owner", "member") else 0)


def test_a_viewer_can_read_a_flag_but_not_review_it(world, client_for):
    url = f"/api/v1/audits/{world['finished'].id}/flags/{world['flag'].id}/reviews/"
    response = client_for("viewer").post(url, {"verdict": "benign"}, format="json")
    assert response.status_code == 403
    assert "needs member or above" in response.json()["detail"]
    assert client_for("viewer").get(url).status_code == 200


def test_objects_of_another_project_cannot_be_combined_into_an_audit(world, client_for, users):
    from audit_service.projects.models import Membership, Project, Role

    other = Project.objects.create(name="Radiology")
    Membership.objects.create(project=other, user=users["member"], role=Role.MEMBER)
    response = client_for("member").post("/api/v1/audits/", {
        "project": other.id, "clip_model": world["model"].id, "probe": world["probe"].id,
        "dataset": world["dataset"].id}, format="json")
    assert response.status_code == 400
    assert response.json()["clip_model"] == ["no such clip model in this project"]


def test_creating_a_project_makes_the_creator_its_owner(client_for):
    response = client_for("outsider").post("/api/v1/projects/", {"name": "Mine"}, format="json")
    assert response.status_code == 201
    assert response.json()["role"] == "owner"
