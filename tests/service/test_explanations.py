"""Explaining one image with a finished audit: the job, its answer, the API's refusals, the page and the client."""
import io

import pytest
from PIL import Image

from audit_service import cli as client
from audit_service.audits import report
from audit_service.audits.explanations import EXPLANATION, create_explanation
from audit_service.audits.models import Explanation, Status
from workers import explanations as explanation_tasks

from .test_corrections import audited  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db


def png(size=(48, 40), colour=(180, 120, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def check_answer(result: dict, audit) -> None:
    classes = audit.probe.class_names
    assert result["classes"] == classes and set(result["heads"]) == {"probe", "zero_shot"}
    # an unnamed latent reads as its likely concept, marked as not named, never as a bare "unlabelled"
    labels = {latent: f"likely “{closest}” (not named)" if label == "unlabelled" else label
              for latent, label, closest in audit.latents.values_list("latent", "label", "closest_concept")}
    flagged = {(f.head, f.latent): f.class_name for f in audit.flags.all()}
    for head, answer in result["heads"].items():
        assert answer["prediction"] in classes
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        for name in classes:
            side = answer["classes"][name]
            assert all(r["relevance"] > 0 for r in side["for"]) and all(r["relevance"] < 0 for r in side["against"])
            for row in side["for"] + side["against"]:
                assert row["label"] == labels[row["latent"]]
                assert bool(row["flagged_for"]) == ((head, row["latent"]) in flagged)
                assert str(row["latent"]) in result["heatmaps"]
    for grid in result["heatmaps"].values():
        assert grid and all(0 <= v <= 255 for line in grid for v in line)


def test_an_item_of_the_dataset_is_explained_by_a_worker(audited, users, queue, django_capture_on_commit_callbacks):  # noqa: F811
    item, label = audited.dataset.labels()[0]
    with django_capture_on_commit_callbacks(execute=True):
        explanation = create_explanation(audit=audited, user=users["member"], item=item)
    assert queue == [(EXPLANATION.task, explanation.pk)]
    explanation_tasks.run_explanation.apply(args=[explanation.pk])
    explanation.refresh_from_db()
    assert explanation.status == Status.SUCCEEDED, explanation.error
    check_answer(explanation.result, audited)
    assert explanation.result["image"]["label"] == label and explanation.result["image"]["item"] == item


def test_an_uploaded_image_is_explained_and_the_page_shows_it(audited, users, queue, web):  # noqa: F811
    from django.core.files.uploadedfile import SimpleUploadedFile

    explanation = create_explanation(audit=audited, user=users["member"],
                                     image=SimpleUploadedFile("lesion.png", png()))
    explanation_tasks.run_explanation.apply(args=[explanation.pk])
    explanation.refresh_from_db()
    assert explanation.status == Status.SUCCEEDED, explanation.error
    check_answer(explanation.result, audited)
    viewer = web("viewer")
    page = viewer.get(f"/explanations/{explanation.pk}/").content.decode()
    assert 'id="predictions"' in page and "explain-table" in page and "uploaded image lesion.png" in page
    rows = sum(len(side["for"]) + len(side["against"]) for answer in explanation.result["heads"].values()
               for side in answer["classes"].values())
    assert rows and page.count('class="heat"') == rows  # every latent row carries its heatmap
    # the strongest latents again as large maps beside the image, at most GALLERY_SIZE, each once
    latents = {r["latent"] for answer in explanation.result["heads"].values() for side in answer["classes"].values()
               for r in side["for"] + side["against"]}
    assert page.count('class="gallery-map"') == min(len(latents), report.GALLERY_SIZE)
    assert page.count('width="224" height="224"') == min(len(latents), report.GALLERY_SIZE) + 1  # + the image
    assert explanation.result["heatmap_options"]["heatmap_method"] == "attnlrp"
    assert "(heatmaps by attnlrp, traced back 3 blocks;" in page  # how its maps were made
    # the offline report carries the finished explanation with the same maps
    offline = report.download_response(audited, "html").content.decode()
    assert f"Explanation #{explanation.pk}: uploaded image lesion.png" in offline
    assert offline.count('class="gallery-map"') == min(len(latents), report.GALLERY_SIZE)
    outsider = web("outsider")
    assert outsider.get(f"/explanations/{explanation.pk}/").status_code == 404


def test_bad_requests_are_refused_and_leave_no_row_or_file(audited, users, project, registered, queue, media,  # noqa: F811
                                                          client_for, settings):
    from audit_service.audits.services import create_audit

    url = f"/api/v1/audits/{audited.pk}/explain/"
    member = client_for("member")
    before = {p for p in media.rglob("*") if p.is_file()}
    cases = [
        ({"item": "nope/missing.png"}, "item", "has no image 'nope/missing.png'"),
        ({}, "image", "give either an image file"),
        ({"item": audited.dataset.labels()[0][0], "image": upload_file("a.png", png())}, "item",
         "not both"),
        ({"image": upload_file("notes.txt", b"hello")}, "image", "not an image file"),
        ({"image": upload_file("broken.png", b"\x89PNG\r\n\x1a\n garbage")}, "image", "is not a readable image"),
    ]
    for body, field, words in cases:
        response = member.post(url, body, format="multipart")
        assert response.status_code == 400, (body, response.content)
        assert words in " ".join(response.json()[field]), response.json()
    settings.MAX_IMAGE_PIXELS = 40 * 40
    big = member.post(url, {"image": upload_file("huge.png", png((48, 40)))}, format="multipart")
    assert big.status_code == 400 and "pixels, over the limit" in big.json()["image"][0]
    assert client_for("viewer").post(url, {"item": "x"}, format="json").status_code == 403
    queued = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                          probe=registered["probe"], dataset=registered["dataset"])
    response = member.post(f"/api/v1/audits/{queued.pk}/explain/", {"item": "x"}, format="json")
    assert response.status_code == 400 and "images are explained with a succeeded audit" in response.json()["audit"][0]
    assert Explanation.objects.count() == 0 and queue == []
    assert {p for p in media.rglob("*") if p.is_file()} == before


def upload_file(name, content):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, content)


def test_the_api_explains_an_item_and_serves_the_answer(audited, client_for, queue):  # noqa: F811
    item = audited.dataset.labels()[0][0]
    response = client_for("member").post(f"/api/v1/audits/{audited.pk}/explain/", {"item": item}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "queued" and body["item"] == item and body["image"] is None
    explanation_tasks.run_explanation.apply(args=[body["id"]])
    answer = client_for("viewer").get(f"/api/v1/explanations/{body['id']}/").json()
    assert answer["status"] == "succeeded"
    check_answer(answer["result"], audited)
    assert client_for("outsider").get(f"/api/v1/explanations/{body['id']}/").status_code == 404


def test_an_engine_failure_fails_the_explanation_with_its_message(audited, users, queue, monkeypatch):  # noqa: F811
    from workers.engine.errors import EngineError

    explanation = create_explanation(audit=audited, user=users["member"], item=audited.dataset.labels()[0][0])
    monkeypatch.setattr(explanation_tasks, "explain_image",
                        lambda *a, **k: (_ for _ in ()).throw(EngineError("the layer has no patch tokens")))
    explanation_tasks.run_explanation.apply(args=[explanation.pk])
    explanation.refresh_from_db()
    assert explanation.status == Status.FAILED and "no patch tokens" in explanation.error


def test_the_client_prints_an_answer():
    result = {"classes": ["melanoma", "nevus"], "image": {"label": "nevus"}, "heatmaps": {}, "heads": {"probe": {
        "prediction": "melanoma", "probabilities": {"melanoma": 0.8, "nevus": 0.2}, "without_flagged": {
            "removed_latents": [7], "prediction": "nevus", "probabilities": {"melanoma": 0.3, "nevus": 0.7}},
        "classes": {"melanoma": {"probability": 0.8, "score": 1.0, "for": [
            {"latent": 7, "relevance": 0.4, "activation": 2.0, "label": "with a ruler", "flagged_for": ["melanoma"]}],
            "against": []}, "nevus": {"probability": 0.2, "score": -1.0, "for": [], "against": []}}}}}
    lines = []
    client.print_explanation(result, lines.append)
    text = "\n".join(lines)
    assert "true class: nevus" in text and "probe: predicts melanoma" in text
    assert "latent 7" in text and "FLAGGED for melanoma" in text and "without its flagged latents [7]: predicts nevus" in text
    args = client.parser().parse_args(["--url", "u", "--token", "t", "explain", "--audit", "1"])
    with pytest.raises(client.Stop, match="give --image PATH"):
        client.explain(args, lines.append)



def test_explanations_are_cancelled_queued_at_once_and_running_between_loading_and_explaining(
        audited, users, queue, client_for, monkeypatch):  # noqa: F811
    import types

    item = audited.dataset.labels()[0][0]
    queued = create_explanation(audit=audited, user=users["member"], item=item)
    assert client_for("viewer").post(f"/api/v1/explanations/{queued.pk}/cancel/").status_code == 403
    assert client_for("member").post(f"/api/v1/explanations/{queued.pk}/cancel/").json()["status"] == "cancelled"
    assert client_for("member").post(f"/api/v1/explanations/{queued.pk}/cancel/").status_code == 409

    running = create_explanation(audit=audited, user=users["member"], item=item)
    build = explanation_tasks.AuditContext.build

    def build_then_cancel(*args, **kwargs):  # the user cancels while the worker loads the model
        body = client_for("member").post(f"/api/v1/explanations/{running.pk}/cancel/").json()
        assert body["status"] == "running" and body["cancel_requested"] is True
        return build(*args, **kwargs)

    monkeypatch.setattr(explanation_tasks, "AuditContext", types.SimpleNamespace(build=build_then_cancel))
    explanation_tasks.run_explanation.apply(args=[running.pk])
    running.refresh_from_db()
    assert running.status == Status.CANCELLED and running.result is None
