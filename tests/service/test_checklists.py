"""Confounder checklists through the service: the job and its answers, the shipped lists, the API's refusals, the
audit option ``suspects``, the report's table (page and download) and its form, cancel and failure."""
import html
import io
import json

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from PIL import Image

from audit_service.audits import report
from audit_service.audits.checklists import (CHECKLIST, IMAGES_MAX, checklist_for_audit, create_checklist,
                                            suspects_from_lines)
from audit_service.audits.models import Audit, Checklist, ChecklistImage, Status, audit_finished
from audit_service.audits.services import create_audit
from audit_service.registry.services import RegistrationError, register_dataset
from workers import checklists as checklist_tasks
from workers import tasks
from workers.engine.checklist import SHIPPED, SUSPECTS_MAX, VERDICTS
from tests.support.synthetic import with_columns
from workers.engine.errors import EngineError

from .conftest import FAST_AUDIT

pytestmark = pytest.mark.django_db

COLUMNS = ("corner", "site")  # corner: 0/1, the white square every melanoma image of the synthetic data has


def marked_zip(source, target):
    """The test dataset with two extra labels.csv columns: ``corner`` (0/1) and ``site`` (head/back)."""
    return with_columns(source, target, {"corner": lambda i, row: int(row.endswith(",melanoma")),
                                         "site": lambda i, row: "head" if i % 2 else "back"})


@pytest.fixture
def marked(project, users, assets, tmp_path):
    from django.core.files.uploadedfile import SimpleUploadedFile

    path = marked_zip(assets["dataset"], tmp_path / "marked.zip")
    dataset = register_dataset(project=project, user=users["member"], name="marked lesions",
                               archive=SimpleUploadedFile("marked.zip", path.read_bytes()))
    assert list(dataset.metadata_columns) == list(COLUMNS)
    return dataset


def run_audit(project, users, registered, dataset, options=None, capture=None):
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=dataset, options={**FAST_AUDIT, **(options or {})})
    if capture is None:
        tasks.run_audit.apply(args=[audit.pk])
    else:
        with capture(execute=True):
            tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    return audit


@pytest.fixture
def audited(project, users, registered, marked):
    return run_audit(project, users, registered, marked)


def images(audit, label):
    return [key for key, lab in audit.dataset.labels() if lab == label]


def suspects_of_every_kind(audit):
    return [{"name": "ruler", "text": "a ruler"}, {"name": "corner", "column": "corner"},
            {"name": "white square", "with": images(audit, "melanoma")[:6], "without": images(audit, "nevus")[:6]}]


def run(checklist):
    checklist_tasks.run_checklist.apply(args=[checklist.pk])
    checklist.refresh_from_db()
    return checklist


def check_answers(checklist, names):
    assert checklist.status == Status.SUCCEEDED, checklist.error
    answers = checklist.result["suspects"]
    assert [a["name"] for a in answers] == names
    classes = set(checklist.audit.probe.class_names)
    for a in answers:
        assert a["verdict"] in VERDICTS and a["evidence"]
        assert a["verdict_class"] is None or a["verdict_class"] in classes
        if a["classes"]:
            assert set(a["classes"]) == classes
            for row in a["classes"].values():
                assert 0.0 <= row["probe_share"] <= 1.0 + 1e-6 and 0.0 <= row["zero_shot_share"] <= 1.0 + 1e-6
    return {a["name"]: a for a in answers}


def test_a_checklist_is_answered_by_a_worker_one_answer_per_suspect(audited, users, queue,
                                                                    django_capture_on_commit_callbacks):
    asked = suspects_of_every_kind(audited)
    with django_capture_on_commit_callbacks(execute=True):
        checklist = create_checklist(audit=audited, user=users["member"], suspects=asked)
    assert queue == [(CHECKLIST.task, checklist.pk)] and checklist.status == Status.QUEUED
    assert checklist.suspects == asked  # stored as asked, in order
    checklist = run(checklist)
    answers = check_answers(checklist, ["ruler", "corner", "white square"])
    assert [answers[n]["kind"] for n in answers] == ["text", "column", "examples"]
    # the column names the images that show it: the melanoma images here
    assert answers["corner"]["present"]["images"] == len(images(audited, "melanoma"))
    assert answers["corner"]["present"]["of"] == audited.dataset.n_images
    assert checklist.stage == "done" and checklist.percent == 100.0
    assert {"extract", "check"} <= set(checklist.timings)
    assert not (settings.AUDIT_WORK_DIR / f"checklist-{checklist.pk}").exists()


def test_a_shipped_checklist_is_asked_by_name_and_served_by_the_api(audited, client_for, queue):
    shipped = client_for("viewer").get("/api/v1/checklists/shipped/").json()
    assert [c["name"] for c in shipped] == list(SHIPPED) and shipped[0]["suspects"] == SHIPPED["dermoscopy"]
    response = client_for("member").post(f"/api/v1/audits/{audited.pk}/checklists/", {"checklist": "dermoscopy"},
                                         format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "queued" and body["shipped"] == "dermoscopy" and body["suspects"] == SHIPPED["dermoscopy"]
    checklist = run(Checklist.objects.get(pk=body["id"]))
    check_answers(checklist, [s["name"] for s in SHIPPED["dermoscopy"]])
    answer = client_for("viewer").get(f"/api/v1/checklists/{checklist.pk}/").json()
    assert answer["status"] == "succeeded" and answer["result"] == checklist.result and answer["audit"] == audited.pk
    listed = client_for("viewer").get(f"/api/v1/audits/{audited.pk}/checklists/").json()
    assert [c["id"] for c in listed] == [checklist.pk]
    assert client_for("outsider").get(f"/api/v1/checklists/{checklist.pk}/").status_code == 404
    assert client_for("outsider").get(f"/api/v1/audits/{audited.pk}/checklists/").status_code == 404
    schema = client_for("viewer").get("/api/v1/schema/?format=json").json()
    assert {"/api/v1/checklists/shipped/", "/api/v1/audits/{id}/checklists/"} <= set(schema["paths"])


def bad_requests(audit):
    melanoma, nevus = images(audit, "melanoma"), images(audit, "nevus")
    ruler = {"name": "ruler", "text": "a ruler"}
    return [
        ({"checklist": "radiology"}, "checklist", "no shipped checklist 'radiology'; the shipped ones are "
                                                  "'dermoscopy', 'chest x-ray'"),
        ({"checklist": "dermoscopy", "suspects": [ruler]}, "checklist", "not both"),
        ({}, "suspects", "give at least one suspect"),
        ({"suspects": []}, "suspects", "give at least one suspect"),
        ({"suspects": {"name": "ruler"}}, "suspects", "give at least one suspect"),
        ({"suspects": [{"name": f"s{i}", "text": "x"} for i in range(SUSPECTS_MAX + 1)]}, "suspects",
         f"at most {SUSPECTS_MAX} suspects"),
        ({"suspects": [{"name": "ink", "column": "ink"}]}, "suspects",
         "dataset 'marked lesions' has no labels.csv column 'ink'; its extra columns are 'corner', 'site'"),
        ({"suspects": [{"name": "site", "column": "site"}]}, "suspects", "column 'site' must hold 0/1"),
        ({"suspects": [{"name": "ruler", "with": melanoma[:3] + ["nope.png"], "without": nevus[:3]}]}, "suspects",
         "suspect 'ruler': 1 example image(s) are not images of dataset 'marked lesions': 'nope.png'; name them as "
         f"its labels.csv does, e.g. {audit.dataset.labels()[0][0]!r}"),
        ({"suspects": [{"name": "ruler", "with": melanoma[:2], "without": nevus[:3]}]}, "suspects",
         "suspect 1: suspect 'ruler': give at least 3 images with it (got 2)"),
        ({"suspects": [ruler, {"name": "ruler", "column": "corner"}]}, "suspects", "repeated: ruler"),
        ({"suspects": [ruler, {"text": "ink"}, {"name": "x"}]}, "suspects", "suspect 3: suspect 'x': give exactly one"),
        # a suspect is named by text, column or examples; a field about zero-shot (or anything else) is refused
        ({"suspects": [{**ruler, "zero_shot": True}]}, "suspects", "unknown suspect field(s) zero_shot"),
    ]


def test_bad_requests_are_refused_naming_the_field_and_leave_no_row(audited, users, project, registered, marked,
                                                                    client_for, queue):
    url = f"/api/v1/audits/{audited.pk}/checklists/"
    member = client_for("member")
    for body, field, words in bad_requests(audited):
        response = member.post(url, body, format="json")
        assert response.status_code == 400, (body, response.content)
        assert words in " ".join(response.json()[field]), (words, response.json())
    queued = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                          probe=registered["probe"], dataset=marked)
    response = member.post(f"/api/v1/audits/{queued.pk}/checklists/", {"checklist": "dermoscopy"}, format="json")
    assert response.status_code == 400
    assert f"audit {queued.pk} is queued; a checklist is asked of a succeeded audit" in response.json()["audit"][0]
    assert client_for("viewer").post(url, {"checklist": "dermoscopy"}, format="json").status_code == 403
    assert client_for("outsider").post(url, {"checklist": "dermoscopy"}, format="json").status_code == 404
    assert Checklist.objects.count() == 0 and queue == []


def test_an_audit_with_the_suspects_option_gets_its_checklist_when_it_succeeds(
        project, users, registered, marked, queue, django_capture_on_commit_callbacks):
    asked = [{"name": "corner", "column": "corner"}, {"name": "ruler", "text": "a ruler"}]
    audit = run_audit(project, users, registered, marked, {"suspects": asked}, django_capture_on_commit_callbacks)
    checklist = Checklist.objects.get()
    assert checklist.audit == audit and checklist.suspects == asked and checklist.created_by == users["member"]
    assert (CHECKLIST.task, checklist.pk) in queue
    check_answers(run(checklist), ["corner", "ruler"])

    # a correction's re-audit carries the corrected audit's options: it does not ask again
    audit.context = {"correction": 1}
    with django_capture_on_commit_callbacks(execute=True):
        audit_finished.send(sender=Audit, audit=audit)
    assert Checklist.objects.count() == 1
    # suspects the dataset cannot answer are kept as a failed checklist saying why, not lost
    Audit.objects.filter(pk=audit.pk).update(config={**audit.config, "suspects": [{"name": "ink", "column": "ink"}]})
    refused = checklist_for_audit(audit.pk)
    assert refused.status == Status.FAILED and "has no labels.csv column 'ink'" in refused.error
    assert Checklist.objects.filter(status=Status.QUEUED).count() == 0


def test_the_report_shows_the_latest_checklist_near_the_top_also_offline(audited, users, web, queue,
                                                                        django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):  # an audit without the option suspects asks nothing
        audit_finished.send(sender=Audit, audit=audited)
    assert Checklist.objects.count() == 0 and queue == []
    page = web("member").get(f"/audits/{audited.pk}/report/").content.decode()
    assert "No checklist has been answered for this audit yet" in page and 'id="checklist-table"' not in page
    checklist = run(create_checklist(audit=audited, user=users["member"], suspects=suspects_of_every_kind(audited)))
    answers = check_answers(checklist, ["ruler", "corner", "white square"])
    view = report.checklist_view(audited)
    assert view["checklist"] == checklist and [r["name"] for r in view["rows"]] == list(answers)
    assert [r["given"] for r in view["rows"]] == ["text “a ruler”", "column corner", "examples (6 with, 6 without)"]
    for page in (web("viewer").get(f"/audits/{audited.pk}/report/").content.decode(),
                 report.download_response(audited, "html").content.decode()):
        assert 'id="checklist-table"' in page and page.count('class="checklist-row"') == 3
        assert page.index('id="checklist-table"') < page.index('id="corrections"') < page.index('id="flags"')
        for a in answers.values():
            assert f'{report.VERDICT_BADGES[a["verdict"]]}">{a["verdict"]}</span>' in page
            if a["match"]["latents"]:
                assert f'latents {", ".join(map(str, a["match"]["latents"]))}' in page
        assert "column corner" in page and "examples (6 with, 6 without)" in page
        assert 'id="ask-checklist"' not in page  # no form for viewers nor offline


def test_the_reports_form_asks_text_suspects_or_a_shipped_list(audited, web, queue,
                                                                django_capture_on_commit_callbacks):
    page = web("member").get(f"/audits/{audited.pk}/report/").content.decode()
    assert 'id="ask-checklist"' in page and '<option value="dermoscopy">' in page
    url = f"/audits/{audited.pk}/checklists/new/"
    with django_capture_on_commit_callbacks(execute=True):
        response = web("member").post(url, {"suspects": "ruler: a ruler\n\nink marking\n", "checklist": ""})
    assert response.status_code == 302 and response["Location"] == f"/audits/{audited.pk}/report/#checklist"
    checklist = Checklist.objects.get()
    assert checklist.suspects == [{"name": "ruler", "text": "a ruler"}, {"name": "ink marking", "text": "ink marking"}]
    assert queue == [(CHECKLIST.task, checklist.pk)]
    job_page = web("viewer").get(f"/checklists/{checklist.pk}/")  # its progress page, as every job kind has
    assert job_page.status_code == 200 and f"Checklist #{checklist.pk}" in job_page.content.decode()
    assert web("viewer").get(f"/checklists/{checklist.pk}/status.json").json()["status"] == "queued"
    assert f'href="/checklists/{checklist.pk}/"' in web("viewer").get(f"/audits/{audited.pk}/report/").content.decode()
    followed = web("member").post(url, {"checklist": "chest x-ray"}, follow=True).content.decode()
    assert "asked about 4 suspects" in followed and Checklist.objects.latest("pk").shipped == "chest x-ray"
    for data, words in (({"checklist": "radiology"}, "no shipped checklist"),
                        ({"suspects": "  \n"}, "give at least one suspect"),
                        ({"suspects": "ruler: a ruler\nruler: a ruler"}, "repeated: ruler"),
                        ({"suspects": "ruler:"}, "give exactly one of text")):
        text = web("member").post(url, data, follow=True).content.decode()
        assert "The checklist was not asked" in text and words in text, (data, words)
    assert web("viewer").post(url, {"checklist": "dermoscopy"}).status_code == 403
    assert web("outsider").post(url, {"checklist": "dermoscopy"}).status_code == 404
    assert Checklist.objects.count() == 2
    # a project's saved list is offered once there is one (the two queued above make room for it)
    for queued in Checklist.objects.filter(status=Status.QUEUED):
        queued.cancel()
    assert "this project's list" not in page
    audited.project.checklist = [{"name": "ruler", "text": "a ruler"}]
    audited.project.save()
    page = web("member").get(f"/audits/{audited.pk}/report/").content.decode()
    assert '<option value="project">this project\'s list (1 suspects)</option>' in page
    followed = web("member").post(url, {"checklist": "project"}, follow=True).content.decode()
    assert "asked about 1 suspects" in followed and Checklist.objects.latest("pk").suspects == \
        audited.project.checklist


def test_form_lines_become_text_suspects():
    assert suspects_from_lines("ruler: a ruler\n  \nhair\n: gel bubbles\nink:") == [
        {"name": "ruler", "text": "a ruler"}, {"name": "hair", "text": "hair"},
        {"name": "gel bubbles", "text": "gel bubbles"}, {"name": "ink"}]


def test_the_worker_weighs_each_suspect_against_every_probe_flag_of_the_audit(audited, users, queue, monkeypatch):
    flags = list(audited.flags.filter(head="probe").order_by("pk"))
    assert flags, "the tiny audit flags something for the probe"
    audited.flags.filter(head="probe").update(confirmed=False)
    audited.flags.filter(pk=flags[0].pk).update(confirmed=True, concept_latents=[flags[0].latent, 999])
    engine, seen = checklist_tasks.check_suspects, {}

    def spy(*args, **kwargs):
        seen["shortcuts"] = kwargs["shortcuts"]
        return engine(*args, **{**kwargs, "shortcuts": [[flags[0].latent]]})

    monkeypatch.setattr(checklist_tasks, "check_suspects", spy)
    checklist = run(create_checklist(audit=audited, user=users["member"], suspects=[{"name": "c", "column": "corner"}]))
    # every probe flag, confirmed or not, each its concept's latents
    assert seen["shortcuts"] == [[flags[0].latent, 999], *[f.concept_latents or [f.latent] for f in flags[1:]]]
    answer = check_answers(checklist, ["c"])["c"]
    for row in answer["classes"].values():
        assert "explained_by" in row and isinstance(row["shortcuts"], list)


def test_checklists_are_cancelled_and_an_engine_failure_fails_one_with_its_message(audited, users, client_for,
                                                                                   queue, monkeypatch):
    queued = create_checklist(audit=audited, user=users["member"], checklist="dermoscopy")
    assert client_for("viewer").post(f"/api/v1/checklists/{queued.pk}/cancel/").status_code == 403
    assert client_for("member").post(f"/api/v1/checklists/{queued.pk}/cancel/").json()["status"] == "cancelled"
    assert client_for("member").post(f"/api/v1/checklists/{queued.pk}/cancel/").status_code == 409

    failing = create_checklist(audit=audited, user=users["member"], suspects=[{"name": "ruler", "text": "a ruler"}])
    engine = checklist_tasks.check_suspects
    monkeypatch.setattr(checklist_tasks, "check_suspects",
                        lambda *a, **k: (_ for _ in ()).throw(EngineError("the layer has no patch tokens")))
    failing = run(failing)
    assert failing.status == Status.FAILED and "no patch tokens" in failing.error and failing.result is None
    assert report.checklist_view(audited) is None  # the report shows succeeded checklists only

    # an audit stored without its relevance tables: the checklist fails saying what to do
    result = dict(audited.result)
    result["artifacts"] = {k: v for k, v in result["artifacts"].items() if k != "relevance.npz"}
    Audit.objects.filter(pk=audited.pk).update(result=result)
    monkeypatch.setattr(checklist_tasks, "check_suspects", engine)
    tableless = run(create_checklist(audit=audited, user=users["member"], suspects=[{"name": "hair", "text": "hair"}]))
    assert tableless.status == Status.FAILED and "kept no relevance tables" in tableless.error
    assert "run the audit again" in tableless.error

    # a project whose jobs fill its limit refuses another, and keeps no row
    project = audited.project
    project.max_concurrent_audits = 1
    project.save()
    create_checklist(audit=audited, user=users["member"], checklist="dermoscopy")
    with pytest.raises(RegistrationError, match="jobs queued or running"):
        create_checklist(audit=audited, user=users["member"], checklist="dermoscopy")
    assert Checklist.objects.count() == 4


def test_the_progress_runs_from_extraction_to_the_check():
    assert checklist_tasks._percent("loading", 0, 0) == 0.0
    assert checklist_tasks._percent("extract", 16, 32) == pytest.approx(checklist_tasks.EXTRACT_WEIGHT / 2)
    assert checklist_tasks._percent("check", 0, 3) == checklist_tasks.EXTRACT_WEIGHT
    assert checklist_tasks._percent("check", 3, 3) == 100.0




def test_a_project_saves_its_own_checklist_and_asks_it_by_the_name_project(audited, client_for, queue):
    project = audited.project
    url = f"/api/v1/audits/{audited.pk}/checklists/"
    response = client_for("member").post(url, {"checklist": "project"}, format="json")
    assert response.status_code == 400 and "has no saved checklist" in response.json()["checklist"][0]
    mine = [{"name": "ruler", "text": "a ruler"}, {"name": "ruler column", "column": "ruler"}]
    # owners save it with the project; a bad list is refused naming the suspect, and nothing is saved
    bad = client_for("owner").patch(f"/api/v1/projects/{project.pk}/", {"checklist": [mine[0], {"name": "x"}]},
                                    format="json")
    assert bad.status_code == 400 and "suspect 2: suspect 'x': give exactly one of" in bad.json()["checklist"][0]
    assert client_for("member").patch(f"/api/v1/projects/{project.pk}/", {"checklist": mine},
                                      format="json").status_code == 403
    saved = client_for("owner").patch(f"/api/v1/projects/{project.pk}/", {"checklist": mine}, format="json")
    assert saved.status_code == 200 and saved.json()["checklist"] == mine
    project.refresh_from_db()
    assert project.checklist == mine
    # asked by name: the column is checked against this audit's dataset (which has no 'ruler' column)
    response = client_for("member").post(url, {"checklist": "project"}, format="json")
    assert response.status_code == 400 and "no labels.csv column 'ruler'" in response.json()["suspects"][0]
    project.checklist = mine[:1]
    project.save()
    response = client_for("member").post(url, {"checklist": "project"}, format="json")
    assert response.status_code == 201 and response.json()["suspects"] == mine[:1]
    checklist = run(Checklist.objects.get(pk=response.json()["id"]))
    check_answers(checklist, ["ruler"])


# --------------------------------------------------------------------------- suspects named by uploaded images

def png(colour=(180, 120, 90), size=(40, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def uploads(*names, colour=(180, 120, 90)):
    return [SimpleUploadedFile(name, png(colour)) for name in names]


WITH_NAMES, WITHOUT_NAMES = ("r1.png", "r2.png", "r3.png"), ("n1.png", "n2.png", "n3.png", "n4.png")


def examples_suspect(audit, name="ruler", with_=WITH_NAMES, without=WITHOUT_NAMES, dataset_images=1):
    """A suspect whose examples are the uploaded files (upload:NAME) and ``dataset_images`` of the dataset's."""
    return {"name": name, "with": [f"upload:{n}" for n in with_] + images(audit, "melanoma")[:dataset_images],
            "without": [f"upload:{n}" for n in without] + images(audit, "nevus")[:dataset_images]}


def stored_files(media) -> set:
    return {p for p in media.rglob("*") if p.is_file()}


def test_example_images_are_uploaded_with_the_suspects_stored_and_removed_with_the_checklist(
        audited, users, client_for, queue, media, django_capture_on_commit_callbacks):
    asked = [{"name": "hair", "text": "hair"}, examples_suspect(audited)]
    files = [*uploads(*WITH_NAMES, colour=(250, 250, 250)), *uploads(*WITHOUT_NAMES)]
    before = stored_files(media)
    url = f"/api/v1/audits/{audited.pk}/checklists/"
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for("member").post(url, {"suspects": json.dumps(asked), "images": files},
                                             format="multipart")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["suspects"] == asked  # the upload: entries kept verbatim, beside the dataset's images
    assert body["images"] == [*WITH_NAMES, *WITHOUT_NAMES]
    checklist = Checklist.objects.get(pk=body["id"])
    assert queue == [(CHECKLIST.task, checklist.pk)] and checklist.suspects == asked
    rows = list(checklist.images.all())
    assert [r.name for r in rows] == [*WITH_NAMES, *WITHOUT_NAMES]
    for row in rows:  # how the worker finds a suspect's upload:NAME: checklist.images, name -> file
        assert row.file.name.startswith(f"projects/{audited.project_id}/checklists/{checklist.pk}/")
        with row.file.open("rb") as fh:
            assert Image.open(fh).size == (40, 32)
    assert (media / rows[0].file.name).read_bytes() == png((250, 250, 250))
    assert stored_files(media) - before == {media / r.file.name for r in rows}
    # the API shows the names where it shows the checklist
    assert client_for("viewer").get(f"/api/v1/checklists/{checklist.pk}/").json()["images"] == body["images"]
    assert client_for("viewer").get(url).json()[0]["images"] == body["images"]
    # JSON requests go on as before: no images
    plain = client_for("member").post(url, {"suspects": [{"name": "ruler", "text": "a ruler"}]}, format="json")
    assert plain.status_code == 201 and plain.json()["images"] == []

    # a deletion rolled back keeps the files; a committed one removes them, also through the audit's cascade
    with pytest.raises(RuntimeError), transaction.atomic():
        checklist.delete()
        raise RuntimeError("rolled back")
    assert stored_files(media) - before == {media / r.file.name for r in rows}
    assert Checklist.objects.get(pk=body["id"]).images.count() == 7
    with django_capture_on_commit_callbacks(execute=True):
        Checklist.objects.get(pk=body["id"]).delete()
    assert stored_files(media) == before and ChecklistImage.objects.count() == 0
    with django_capture_on_commit_callbacks(execute=True):
        second = create_checklist(audit=audited, user=users["member"], suspects=[examples_suspect(audited)],
                                  images=[*uploads(*WITH_NAMES), *uploads(*WITHOUT_NAMES)])
    assert second.images.count() == 7 and len(stored_files(media) - before) == 7
    with django_capture_on_commit_callbacks(execute=True):
        Audit.objects.filter(pk=audited.pk).delete()
    assert stored_files(media) == before and ChecklistImage.objects.count() == 0


def bad_uploads(audit):
    """(multipart body, field, words) of requests with example images that are refused (each its own files)."""
    def good():
        return [*uploads(*WITH_NAMES), *uploads(*WITHOUT_NAMES)]

    asked = json.dumps([examples_suspect(audit)])
    return [
        ({"suspects": json.dumps([examples_suspect(audit, with_=("r1.png", "r2.png", "r9.png"))]), "images": good()},
         "suspects", "suspect 'ruler': upload:r9.png names no uploaded file; uploaded: 'n1.png', 'n2.png', "
                     "'n3.png', 'n4.png', 'r1.png' and 2 more"),
        ({"suspects": asked}, "suspects", "upload:r1.png, upload:r2.png, upload:r3.png, upload:n1.png, upload:n2.png "
                                          "and 2 more name no uploaded file; no image was uploaded"),
        ({"suspects": asked, "images": [*good(), *uploads("extra.png")]}, "images",
         "uploaded image(s) no suspect names: 'extra.png'; name each in a suspect's with or without list as "
         "upload:NAME (e.g. upload:extra.png)"),
        ({"suspects": asked, "images": [*good(), *uploads("r1.png")]}, "images",
         "distinct file names; repeated: 'r1.png'"),
        ({"suspects": json.dumps([examples_suspect(audit, with_=("r1.png", "r2.png", "notes.txt"))]),
          "images": [*good()[:2], SimpleUploadedFile("notes.txt", b"hello"), *good()[3:]]}, "images",
         "'notes.txt' is not an image file; upload example images as one of .png"),
        ({"suspects": asked, "images": [*good()[:2], SimpleUploadedFile("r3.png", b"\x89PNG\r\n\x1a\n garbage"),
                                        *good()[3:]]}, "images", "example image r3.png is not a readable image"),
        ({"checklist": "dermoscopy", "images": good()}, "images", "not with a shipped checklist or the project's list"),
        ({"suspects": "[{\"name\": \"ruler\""}, "suspects", "suspects is not valid JSON"),
        ({"suspects": json.dumps([{**examples_suspect(audit), "with": ["upload:r1.png", "upload:r2.png"]}]),
          "images": good()}, "suspects", "give at least 3 images with it (got 2)"),
        ({"suspects": json.dumps([examples_suspect(audit, with_=("r1.png", "r2.png", "n1.png"))]),
          "images": [*good()[:2], *good()[3:]]}, "suspects", "images both with and without it: upload:n1.png"),
    ]


def test_refused_uploads_say_what_is_wrong_and_leave_no_row_and_no_file(audited, users, client_for, queue, media,
                                                                        settings, monkeypatch):
    url = f"/api/v1/audits/{audited.pk}/checklists/"
    member = client_for("member")
    before = stored_files(media)
    for body, field, words in bad_uploads(audited):
        response = member.post(url, body, format="multipart")
        assert response.status_code == 400, (body, response.content)
        assert words in " ".join(response.json()[field]), (words, response.json())
    asked = json.dumps([examples_suspect(audit=audited)])
    settings.MAX_IMAGE_PIXELS = 30 * 30
    big = member.post(url, {"suspects": asked, "images": [*uploads(*WITH_NAMES), *uploads(*WITHOUT_NAMES)]},
                      format="multipart")
    assert big.status_code == 400 and "example image r1.png has 40x32 pixels, over the limit of 900" in \
        big.json()["images"][0]
    settings.MAX_IMAGE_PIXELS = 40_000_000
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 5  # more files than a request may carry: a 400 naming images
    many = member.post(url, {"suspects": asked, "images": [*uploads(*WITH_NAMES), *uploads(*WITHOUT_NAMES)]},
                       format="multipart")
    assert many.status_code == 400 and "too many files in one request: at most 5" in many.json()["images"][0]
    with pytest.raises(RegistrationError, match=f"at most {IMAGES_MAX} example images in one checklist, got 101"):
        create_checklist(audit=audited, user=users["member"], suspects=[examples_suspect(audited)],
                         images=uploads(*[f"x{i}.png" for i in range(IMAGES_MAX + 1)]))
    # a project without room refuses before storing anything
    project = audited.project
    project.max_concurrent_audits = 0
    project.save()
    with pytest.raises(RegistrationError, match="jobs queued or running"):
        create_checklist(audit=audited, user=users["member"], suspects=[examples_suspect(audited)],
                         images=[*uploads(*WITH_NAMES), *uploads(*WITHOUT_NAMES)])
    project.max_concurrent_audits = 4
    project.save()
    # storing fails midway (the disk fills up): the files already stored go, and the row with them
    real_save, saved = ChecklistImage.save, []

    def save_then_fail(self, *args, **kwargs):
        if len(saved) == 3:
            raise OSError("No space left on device")
        saved.append(self.file.name)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(ChecklistImage, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        create_checklist(audit=audited, user=users["member"], suspects=[examples_suspect(audited)],
                         images=[*uploads(*WITH_NAMES), *uploads(*WITHOUT_NAMES)])
    assert len(saved) == 3
    assert Checklist.objects.count() == 0 and ChecklistImage.objects.count() == 0 and queue == []
    assert stored_files(media) == before


def test_the_reports_form_asks_a_suspect_by_uploaded_example_images(audited, web, queue, media,
                                                                    django_capture_on_commit_callbacks):
    page = web("member").get(f"/audits/{audited.pk}/report/").content.decode()
    form = page[page.index('id="ask-checklist"'):]
    form = form[:form.index("</form>")]
    assert 'enctype="multipart/form-data"' in form and "By example images" in form
    for field in ('name="examples_name"', 'name="with_images" multiple', 'name="without_images" multiple'):
        assert field in form
    url = f"/audits/{audited.pk}/checklists/new/"
    before = stored_files(media)
    for data, words in (
            ({"examples_name": "ruler", "with_images": uploads(*WITH_NAMES)}, "choose image files both with it "
                                                                               "and without it"),
            ({"with_images": uploads(*WITH_NAMES), "without_images": uploads(*WITHOUT_NAMES)},
             "name the suspect your example images show"),
            ({"examples_name": "ruler", "with_images": uploads("r1.png", "r2.png"),
              "without_images": uploads(*WITHOUT_NAMES)}, "give at least 3 images with it (got 2)"),
            ({"examples_name": "ruler", "with_images": uploads(*WITH_NAMES), "without_images": uploads("r1.png", *WITHOUT_NAMES)},
             "images both with and without it: upload:r1.png"),
            ({"checklist": "dermoscopy", "examples_name": "ruler", "with_images": uploads(*WITH_NAMES),
              "without_images": uploads(*WITHOUT_NAMES)}, "not with a shipped checklist"),
            ({"examples_name": "ruler", "with_images": [*uploads("r1.png", "r2.png"),
                                                         SimpleUploadedFile("r3.png", b"not a png")],
              "without_images": uploads(*WITHOUT_NAMES)}, "example image r3.png is not a readable image")):
        text = web("member").post(url, data, follow=True).content.decode()
        assert "The checklist was not asked" in text and html.escape(words) in text, (data, words)
    assert Checklist.objects.count() == 0 and stored_files(media) == before
    with django_capture_on_commit_callbacks(execute=True):
        response = web("member").post(url, {"suspects": "hair: hair", "checklist": "", "examples_name": " ruler ",
                                            "with_images": uploads(*WITH_NAMES, colour=(250, 250, 250)),
                                            "without_images": uploads(*WITHOUT_NAMES)})
    assert response.status_code == 302 and response["Location"] == f"/audits/{audited.pk}/report/#checklist"
    checklist = Checklist.objects.get()
    assert checklist.suspects == [{"name": "hair", "text": "hair"},
                                  {"name": "ruler", "with": [f"upload:{n}" for n in WITH_NAMES],
                                   "without": [f"upload:{n}" for n in WITHOUT_NAMES]}]
    assert [i.name for i in checklist.images.all()] == [*WITH_NAMES, *WITHOUT_NAMES]
    assert (media / checklist.images.get(name="r1.png").file.name).read_bytes() == png((250, 250, 250))
    assert queue == [(CHECKLIST.task, checklist.pk)]


def test_uploaded_examples_are_answered_by_the_worker_and_the_report_maps_where_each_suspect_is(
        audited, users, web, queue, media, django_capture_on_commit_callbacks):
    """The worker reads the uploaded files (upload:NAME) beside the dataset's images; each answer names the audited
    images that show the suspect most, and the report lays its latents' heatmap over each."""
    suspects = [{"name": "ruler", "text": "a ruler"}, examples_suspect(audited, name="white corner")]
    with django_capture_on_commit_callbacks(execute=True):
        checklist = create_checklist(audit=audited, user=users["member"], suspects=suspects,
                                     images=[*uploads(*WITH_NAMES, colour=(250, 250, 250)), *uploads(*WITHOUT_NAMES)])
    answers = check_answers(run(checklist), ["ruler", "white corner"])
    uploaded = answers["white corner"]
    assert uploaded["kind"] == "examples" and uploaded["match"]["latents"]
    keys = {key for key, _ in audited.dataset.labels()}
    for a in answers.values():
        assert a["top_images"] and set(a["top_images"]) <= keys and set(a["heatmaps"]) == set(a["top_images"])
    rows = {r["name"]: r for r in report.checklist_view(audited)["rows"]}
    for name, a in answers.items():
        pictures = rows[name]["pictures"]
        assert [p["key"] for p in pictures] == a["top_images"]
        assert all(p["heat"].startswith("data:image/jpeg;base64,") for p in pictures)
    for page in (web("viewer").get(f"/audits/{audited.pk}/report/").content.decode(),
                 report.download_response(audited, "html").content.decode()):
        assert page.count('class="checklist-pictures"') == 2
        assert f'alt="heatmap of white corner on {uploaded["top_images"][0]}"' in page
    # the uploads stay the checklist's: a worker re-run (a redelivered task) reads them again
    assert run(Checklist.objects.get(pk=checklist.pk)).status == Status.SUCCEEDED


def test_a_list_kept_for_later_cannot_name_uploaded_images(audited, client_for, project, registered, marked, users):
    with_upload = {"name": "tape", "with": ["upload:a.png", "b", "c"], "without": ["d", "e", "f"]}
    saved = client_for("owner").patch(f"/api/v1/projects/{audited.project.pk}/", {"checklist": [with_upload]},
                                      format="json")
    assert saved.status_code == 400 and "a project's saved checklist cannot name uploaded images" in \
        saved.json()["checklist"][0]
    with pytest.raises(RegistrationError, match="the audit option suspects cannot name uploaded images"):
        create_audit(project=project, user=users["member"], clip_model=registered["model"], probe=registered["probe"],
                     dataset=marked, options={**FAST_AUDIT, "suspects": [with_upload]})
