"""Corrections through the service: the job, its re-audit, lineage, the API's refusals, cancel and failure."""
import pytest
from django.conf import settings

from audit_service.audits import corrections
from audit_service.audits.corrections import CORRECTION, create_correction, finish_after_reaudit
from audit_service.audits.models import Audit, Correction, Flag, Latent, Review, Status, Verdict, audit_finished
from audit_service.audits.services import AUDIT, create_audit
from audit_service.registry.models import Probe
from audit_service.registry.services import RegistrationError, register_dataset
from workers import corrections as correction_tasks
from workers import tasks
from workers.engine.errors import EngineError
from workers.engine.heads import LinearProbe
from workers.engine.rounds import still_flagged_groups

from .conftest import FAST_AUDIT, upload

pytestmark = pytest.mark.django_db


@pytest.fixture
def audited(project, users, registered):
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.flags.filter(head="probe").exists()
    return audit


def probe_flag(audit) -> Flag:
    return audit.flags.filter(head="probe").order_by("-share").first()


def run_correction_and_reaudit(correction, capture):
    """The correction's task, then its re-audit's task, each with its commit callbacks run as in production."""
    with capture(execute=True):
        correction_tasks.run_correction.apply(args=[correction.pk])
    correction.refresh_from_db()
    assert correction.status == Status.RUNNING and correction.stage == "reaudit", correction.error
    with capture(execute=True):
        tasks.run_audit.apply(args=[correction.reaudit_id])
    correction.refresh_from_db()
    return correction


def run_every_round(correction, capture):
    """:func:`run_correction_and_reaudit` for each round the correction asks for, until it finishes."""
    correction = run_correction_and_reaudit(correction, capture)
    while correction.status == Status.QUEUED and correction.stage.startswith("round "):
        correction = run_correction_and_reaudit(correction, capture)
    return correction


def test_a_correction_writes_a_new_probe_version_proves_it_and_reaudits_it_on_the_same_sae(
        audited, users, queue, django_capture_on_commit_callbacks):
    flag = probe_flag(audited)
    # "removal": what the latent takes from the features through the real tail, so the projected probe cannot read
    # it and its flag must go (the default "regression" estimate is proven on the case study: tests/casestudy; on
    # these 32 random images its within-class slope is noise, and the verdict says so, as the next test shows)
    with django_capture_on_commit_callbacks(execute=True):
        correction = create_correction(audit=audited, user=users["member"], flag_ids=[flag.pk],
                                       options={"directions": "removal"})
    assert queue == [(CORRECTION.task, correction.pk)] and correction.status == Status.QUEUED
    correction = run_every_round(correction, django_capture_on_commit_callbacks)
    assert correction.status == Status.SUCCEEDED, correction.error
    assert 1 <= len(correction.result["rounds"]) <= correction.options["rounds"] == 3
    assert (AUDIT.task, correction.reaudit_id) in queue

    # lineage: a version of the audited probe, of its format, registered in the project
    new = correction.new_probe
    old = audited.probe
    assert new.parent == old and new.version == old.version + 1 and new.project == audited.project
    assert new.made_by == correction and new.class_names == old.class_names
    assert new.normalization == old.normalization and new.file.name.endswith(".npz")
    loaded = LinearProbe.load(new.file.path)
    assert loaded.class_names == old.class_names and loaded.weight.shape == LinearProbe.load(old.file.path).weight.shape
    assert new.sha256 != old.sha256

    # the proof table: old vs new overall, per class, on the chosen flag's four sides and the clean images
    result = correction.result
    table = result["correction"]["table"]
    assert result["method"] == "project" and "no training split" in result["reason"]
    assert set(table["per_class"]) == set(old.class_names)
    sides = [name for name in table["slices"] if f"latent {flag.latent}" in name]
    assert len(sides) == 4 and table["clean_slice"] in table["slices"]
    for row in [table["overall"], *table["per_class"].values(), *table["slices"].values()]:
        assert row["old"] is None or 0.0 <= row["old"] <= 1.0

    # the re-audit: the same model, data and SAE (its latents are the original's), diffed latent by latent
    reaudit = correction.reaudit
    assert reaudit.status == Status.SUCCEEDED and reaudit.sae_from == audited and reaudit.probe == new
    assert list(Latent.objects.filter(audit=reaudit).values_list("latent", "label")) == \
        list(Latent.objects.filter(audit=audited).values_list("latent", "label"))
    diff = result["reaudit"]["diff"]
    assert diff["same_sae"] and diff["baseline"] == audited.pk and diff["audit"] == reaudit.pk
    verdict = result["verdict"]
    assert verdict["checks"]["flags_removed"], verdict
    assert not reaudit.flags.filter(head="probe", class_name=flag.class_name, latent=flag.latent).exists()
    assert verdict["passed"] == (not verdict["reasons"])
    assert "reaudit" in correction.timings and not (settings.AUDIT_WORK_DIR / f"correction-{correction.pk}").exists()
    # the flag links to the correction that answered it
    assert list(flag.corrections.all()) == [correction]


def test_the_default_estimate_is_one_regression_direction_per_concept_and_its_verdict_is_reported(
        audited, users, queue, django_capture_on_commit_callbacks):
    flag = probe_flag(audited)
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[flag.pk])
    assert correction.options["directions"] == "regression" and correction.options["anchor"] == "mean"
    correction = run_every_round(correction, django_capture_on_commit_callbacks)
    assert correction.status == Status.SUCCEEDED, correction.error
    shortcut = correction.result["correction"]["shortcut"]
    assert shortcut["estimate"] == "regression"
    first = flag.concept_latents or [flag.latent]  # the first round's concept; a later round's grows from it
    assert correction.result["rounds"][0]["concepts"] == [first]
    assert shortcut["concepts"][0][:len(first)] == first
    verdict = correction.result["verdict"]
    assert verdict["passed"] == all(verdict["checks"].values()) and len(verdict["reasons"]) == \
        sum(not ok for ok in verdict["checks"].values())


def test_by_default_the_flags_reviewed_as_confirmed_shortcuts_are_corrected(audited, users, queue):
    with pytest.raises(RegistrationError, match="none of this audit's probe flags is reviewed as a confirmed"):
        create_correction(audit=audited, user=users["member"])
    flags = list(audited.flags.filter(head="probe"))
    Review.objects.create(flag=flags[0], reviewer=users["member"], verdict=Verdict.CONFIRMED_SHORTCUT)
    if len(flags) > 1:
        Review.objects.create(flag=flags[1], reviewer=users["member"], verdict=Verdict.BENIGN)
    correction = create_correction(audit=audited, user=users["member"])
    assert list(correction.flags.all()) == [flags[0]]


def test_bad_requests_are_refused_naming_the_problem_and_leave_no_row(audited, users, project, registered, queue,
                                                                     client_for):
    flag = probe_flag(audited)
    zero_shot = audited.flags.filter(head="zero_shot").first()
    other = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    url = f"/api/v1/audits/{audited.pk}/corrections/"
    cases = [
        ({"flags": [999999]}, "flags", "are not flags of audit"),
        ({"flags": "1"}, "flags", "non-empty list of flag ids"),
        ({"flags": []}, "flags", "non-empty list of flag ids"),
        ({"flags": [True]}, "flags", "non-empty list of flag ids"),
        ({"flags": [flag.pk], "method": "erase"}, "method", "must be one of project, refit, reweight"),
        ({"flags": [flag.pk], "method": "refit"}, "training_dataset", "needs the probe's training split"),
        ({"flags": [flag.pk], "method": "reweight"}, "training_dataset", "'reweight' method needs the probe's"),
        ({"flags": [flag.pk], "options": {"anchor": "middle"}}, "options", "anchor"),
        ({"flags": [flag.pk], "options": {"max_clean_drop": 5}}, "options", "max_clean_drop"),
        ({"flags": [flag.pk], "options": {"C": 1.0}}, "options", "needs a training_dataset"),
        ({"flags": [flag.pk], "options": {"rounds": 0}}, "options", "rounds"),
        ({"flags": [flag.pk], "options": {"rounds": 6}}, "options", "rounds"),
        ({"flags": [flag.pk], "options": {"tolerance": 1}}, "options", "tolerance"),
        ({"flags": [flag.pk], "options": "fast"}, "options", "JSON object"),
        ({"flags": [flag.pk], "training_dataset": 999999}, "training_dataset", "no such dataset"),
        ({"flags": [flag.pk], "method": "project", "training_dataset": registered["dataset"].pk},
         "training_dataset", "uses the audit's data only"),
    ]
    if zero_shot is not None:
        cases.append(({"flags": [zero_shot.pk]}, "flags", "zero-shot flags"))
    client = client_for("member")
    for body, field, words in cases:
        response = client.post(url, body, format="json")
        assert response.status_code == 400, (body, response.content)
        assert words in " ".join(response.json()[field]), (body, response.json())
    response = client.post(f"/api/v1/audits/{other.pk}/corrections/", {"flags": [flag.pk]}, format="json")
    assert response.status_code == 400 and "only a succeeded audit" in response.json()["audit"][0]
    assert client_for("viewer").post(url, {"flags": [flag.pk]}, format="json").status_code == 403
    assert client_for("outsider").post(url, {"flags": [flag.pk]}, format="json").status_code == 404
    assert Correction.objects.count() == 0 and queue == []


def test_the_api_makes_lists_and_cancels_a_correction(audited, client_for, queue):
    flag = probe_flag(audited)
    client = client_for("member")
    response = client.post(f"/api/v1/audits/{audited.pk}/corrections/", {"flags": [flag.pk]}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "queued" and body["flags"] == [flag.pk] and body["audit"] == audited.pk
    assert [c["id"] for c in client.get(f"/api/v1/audits/{audited.pk}/corrections/").json()] == [body["id"]]
    assert client_for("viewer").get(f"/api/v1/corrections/{body['id']}/").json()["id"] == body["id"]
    assert client_for("viewer").post(f"/api/v1/corrections/{body['id']}/cancel/").status_code == 403
    assert client.post(f"/api/v1/corrections/{body['id']}/cancel/").json()["status"] == "cancelled"
    assert client.post(f"/api/v1/corrections/{body['id']}/cancel/").status_code == 409
    assert client.get(f"/api/v1/audits/{audited.pk}/flags/{flag.pk}/").json()["corrections"] == [body["id"]]


def test_a_refit_uses_the_training_dataset(audited, users, project, assets, queue, django_capture_on_commit_callbacks):
    training = register_dataset(project=project, user=users["member"], name="probe training split",
                                archive=upload(assets["dataset"], "train.zip"))
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk],
                                   training_dataset=training, options={"C": 1.0})
    with django_capture_on_commit_callbacks(execute=True):
        correction_tasks.run_correction.apply(args=[correction.pk])
    correction.refresh_from_db()
    assert correction.stage == "reaudit", correction.error
    info = correction.result["correction"]["info"]
    assert correction.result["method"] == "refit" and "training split given" in correction.result["reason"]
    assert info["C"] == 1.0 and info["n_train"] == training.n_images


def test_a_reweighted_fit_lists_the_data_behind_the_shortcut(audited, users, project, assets, queue, client_for, web,
                                                            django_capture_on_commit_callbacks):
    training = register_dataset(project=project, user=users["member"], name="probe training split",
                                archive=upload(assets["dataset"], "train.zip"))
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk],
                                   method="reweight", training_dataset=training)
    with django_capture_on_commit_callbacks(execute=True):
        correction_tasks.run_correction.apply(args=[correction.pk])
    correction.refresh_from_db()
    assert correction.stage == "reaudit", correction.error
    assert correction.result["method"] == "reweight"
    info = correction.result["correction"]["info"]
    assert info["n_train"] == training.n_images and set(info["counts_before"]) == set(audited.probe.class_names)
    data = correction.result["correction"]["training_data"]
    labels = dict(training.labels())
    assert data["images"] == training.n_images
    assert data["with_concept"] == len(data["rows"]) == sum(c["with"] for c in data["classes"].values()) > 0
    assert all(labels[r["image"]] == r["class"] for r in data["rows"])  # each image with its own class
    activations = [r["activation"] for r in data["rows"]]
    assert activations == sorted(activations, reverse=True) and activations[-1] > 0
    # the list as CSV, through the API and the page, for viewers too
    listing = client_for("viewer").get(f"/api/v1/corrections/{correction.pk}/training-data/")
    assert listing.status_code == 200 and listing["Content-Type"].startswith("text/csv")
    lines = b"".join(listing.streaming_content).decode().splitlines()
    assert lines[0] == "image,class,activation" and len(lines) == len(data["rows"]) + 1
    assert lines[1].split(",")[:2] == [data["rows"][0]["image"], data["rows"][0]["class"]]
    page = web("viewer").get(f"/corrections/{correction.pk}/").content.decode()
    assert "The data behind the shortcut" in page and "Download the list (CSV)" in page
    assert f"of the probe's {training.n_images} training images, {data['with_concept']} have" in page
    assert web("viewer").get(f"/corrections/{correction.pk}/training-data.csv").status_code == 200
    assert web("outsider").get(f"/corrections/{correction.pk}/training-data.csv").status_code == 404


def test_a_correction_without_a_training_split_has_no_training_data_and_says_why(audited, users, queue, client_for):
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk])
    answer = client_for("viewer").get(f"/api/v1/corrections/{correction.pk}/training-data/")
    assert answer.status_code == 409 and "made without the probe's training split" in answer.json()["detail"]


def test_an_engine_error_fails_the_correction_and_leaves_no_probe_or_files(audited, users, queue, monkeypatch):
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk])

    def broken(*args, **kwargs):
        (settings.AUDIT_WORK_DIR / f"correction-{correction.pk}" / "half-written").mkdir(parents=True)
        raise EngineError("latents [3] are active on no image of the split")

    monkeypatch.setattr(correction_tasks, "run_engine", broken)
    probes = Probe.objects.count()
    correction_tasks.run_correction.apply(args=[correction.pk])
    correction.refresh_from_db()
    assert correction.status == Status.FAILED and "active on no image" in correction.error
    assert Probe.objects.count() == probes and correction.new_probe is None and correction.reaudit is None
    assert not (settings.AUDIT_WORK_DIR / f"correction-{correction.pk}").exists()
    assert Audit.objects.count() == 1


def test_a_failed_registration_removes_the_written_probe_file(audited, users, queue, monkeypatch, media):
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk])
    monkeypatch.setattr(Audit.objects, "create",
                        lambda **kw: (_ for _ in ()).throw(RuntimeError("database went away")))
    before = {p for p in media.rglob("*") if p.is_file()}
    correction_tasks.run_correction.apply(args=[correction.pk])
    correction.refresh_from_db()
    assert correction.status == Status.FAILED and "database went away" in correction.error
    assert {p for p in media.rglob("*") if p.is_file()} == before
    assert Probe.objects.filter(parent=audited.probe).count() == 0


def test_cancelling_while_the_reaudit_runs_cancels_both(audited, users, queue, django_capture_on_commit_callbacks):
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk])
    correction_tasks.run_correction.apply(args=[correction.pk])
    correction.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        correction.cancel()  # the re-audit is queued: cancelled at once, and the correction with it
    correction.refresh_from_db()
    assert correction.reaudit.status == Status.CANCELLED and correction.status == Status.CANCELLED


def test_a_failed_reaudit_fails_the_correction_and_the_reaper_answers_one_it_missed(
        audited, users, queue, monkeypatch):
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk])
    correction_tasks.run_correction.apply(args=[correction.pk])
    correction.refresh_from_db()
    reaudit = correction.reaudit
    # the re-audit's worker failed it but died before its commit callback told the correction
    audit_finished.disconnect(corrections._answer_waiting_corrections)
    try:
        reaudit.fail("out of memory")
    finally:
        audit_finished.connect(corrections._answer_waiting_corrections)
    assert Correction.objects.get(pk=correction.pk).status == Status.RUNNING
    done = tasks.reap_stale_audits()
    assert done["corrections"]["answered"] == [correction.pk]
    correction.refresh_from_db()
    assert correction.status == Status.FAILED
    assert f"audit {reaudit.pk}) failed: out of memory" in correction.error and "stays registered" in correction.error
    finish_after_reaudit(correction.pk)  # a second answer changes nothing
    assert Correction.objects.get(pk=correction.pk).status == Status.FAILED


def test_probes_show_their_lineage_download_and_keep_their_versions(audited, users, queue, client_for):
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk])
    correction_tasks.run_correction.apply(args=[correction.pk])
    correction.refresh_from_db()
    client = client_for("viewer")
    body = client.get(f"/api/v1/probes/{correction.new_probe_id}/").json()
    assert body["parent"] == audited.probe_id and body["version"] == 2 and body["correction"] == correction.pk
    assert client.get(f"/api/v1/probes/{audited.probe_id}/").json()["correction"] is None
    response = client.get(f"/api/v1/probes/{correction.new_probe_id}/download/")
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == correction.new_probe.file.open("rb").read()
    assert client_for("outsider").get(f"/api/v1/probes/{correction.new_probe_id}/download/").status_code == 404
    response = client_for("member").delete(f"/api/v1/probes/{audited.probe_id}/")
    assert response.status_code == 400


def _entry(class_name, latent, label="a ruler", head="probe"):
    flag = {"latent": latent, "label": label}
    return {"head": head, "class_name": class_name, "baseline": flag, "current": flag}


def test_the_verdict_says_what_it_meets_and_what_remains_of_the_shortcut(audited, users, queue):
    """A correction of melanoma's latent 7 (its concept also spread over latent 9): the re-audit no longer flags
    7 but still flags 9; melanomas without 7 are still missed far more often than melanomas with it, while the
    nevi with 7 now fare like those without. The gate's checks pass; the verdict still says what remains."""
    flag = probe_flag(audited)
    flag.class_name, flag.latent, flag.concept_latents = "melanoma", 7, [7, 9]
    flag.save()
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[flag.pk])

    def row(old, new, n=20):
        return {"n": n, "old": old, "new": new, "change": new - old}

    table = {"clean_slice": "clean", "slices": {
        "melanoma, latent 7 active": row(0.95, 0.90), "melanoma, latent 7 inactive": row(0.50, 0.70),
        "nevus, latent 7 active": row(0.40, 0.85), "nevus, latent 7 inactive": row(0.90, 0.90),
        "clean": row(0.80, 0.80)}}
    diff = {"changed": [], "unchanged": [_entry("melanoma", 9)], "new": [], "gone": [_entry("melanoma", 7)]}
    answer = corrections.verdict(correction, table, diff)
    assert answer["passed"] and answer["reasons"] == []
    assert answer["concept_remaining"] == [{"class_name": "melanoma", "latent": 9, "flag_latent": 7}]
    hurt = {s["slice"]: s for s in answer["slices"]}
    assert set(hurt) == {"melanoma, latent 7 inactive", "nevus, latent 7 active"}
    assert hurt["melanoma, latent 7 inactive"]["gap_before"] == pytest.approx(0.45)
    assert hurt["melanoma, latent 7 inactive"]["gap_after"] == pytest.approx(0.20)
    assert hurt["melanoma, latent 7 inactive"]["still_hurt"] and not hurt["nevus, latent 7 active"]["still_hurt"]
    assert "the chosen flags are gone" in answer["meets"] and "nothing new is flagged" in answer["meets"]
    assert not any("other latent of the chosen concepts" in m or "no hurt slice" in m for m in answer["meets"])
    assert answer["remains"] == [
        "other latents of the chosen concepts are still flagged: latent 9 (with latent 7) for melanoma",
        "still hurt: melanoma, latent 7 inactive at 0.700, 0.200 below melanoma, latent 7 active (the gap was 0.450)"]

    # once the concept is gone and the gap closed, the verdict says so
    table["slices"]["melanoma, latent 7 inactive"] = row(0.50, 0.88)
    answer = corrections.verdict(correction, table, {**diff, "unchanged": []})
    assert answer["remains"] == [] and "no other latent of the chosen concepts is flagged" in answer["meets"]
    assert "no hurt slice trails its counterpart by 0.1 or more" in answer["meets"]
    # a failed check is a reason (the gate's), and stays out of what it meets
    table["slices"]["clean"] = row(0.80, 0.70)
    answer = corrections.verdict(correction, table, {**diff, "unchanged": [_entry("melanoma", 7)]})
    assert not answer["passed"] and answer["reasons"][0] == "the re-audit still flags latent 7 for melanoma"
    assert "the chosen flags are gone" not in answer["meets"] and len(answer["reasons"]) == 2

    # a latent the re-audit flags that tracks the corrected concept is what remains of it too
    tracking = [{"concept": [7, 9], "latents": {"12": 0.93}}]
    diff = {"changed": [], "unchanged": [], "new": [_entry("nevus", 12), _entry("nevus", 30)], "gone": []}
    answer = corrections.verdict(correction, table, diff, tracking)
    assert answer["concept_remaining"] == [{"class_name": "nevus", "latent": 12, "flag_latent": None,
                                            "concept": [7, 9], "share": 0.93}]
    assert answer["remains"][0] == ("other latents of the chosen concepts are still flagged: latent 12 (tracks the "
                                    "corrected concept: 93% of its activation on its images) for nevus")


def test_a_correction_goes_on_in_rounds_while_its_reaudit_flags_latents_that_track_the_concept(
        audited, users, queue, monkeypatch, web, client_for, django_capture_on_commit_callbacks):
    """Every other latent is made to track the corrected concept, so each re-audit's other probe flags join it
    and the original probe is corrected again, until the rounds (2) run out."""
    from workers.engine import correct_audit

    def everything_tracks(run, store, concepts):
        return [{"concept": list(c), "images_with": 1, "share_needed": 0.8,
                 "latents": {str(i): 0.9 for i in range(run.sae.n_latents) if i not in c}} for c in concepts]

    monkeypatch.setattr(correct_audit, "tracking_latents", everything_tracks)
    flag = probe_flag(audited)
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[flag.pk],
                                   options={"directions": "removal", "rounds": 2})
    correction = run_correction_and_reaudit(correction, django_capture_on_commit_callbacks)
    first_reaudit, first_probe = correction.reaudit_id, correction.new_probe_id
    [first] = correction.result["rounds"]
    flagged = corrections.flagged_latents(Audit.objects.get(pk=first_reaudit))
    concept = flag.concept_latents or [flag.latent]
    expected = [latent for latent in flagged if latent not in concept]
    split = still_flagged_groups([concept], flagged)  # the concept's latents still flagged, if not all of it
    assert expected, "the re-audit flags nothing else, so this test shows no second round"
    assert first["round"] == 1 and first["concepts"] == [concept] and first["added"] == [expected]
    assert first["split"] == split
    assert first["audit"] == first_reaudit and first["probe"] == first_probe and "overall" in first["table"]
    # back in the queue for round 2, its task sent again
    assert correction.status == Status.QUEUED and correction.stage == "round 2" and correction.attempts == 0
    assert queue[-1] == (CORRECTION.task, correction.pk) and correction.round == 2

    correction = run_correction_and_reaudit(correction, django_capture_on_commit_callbacks)
    assert correction.status == Status.SUCCEEDED, correction.error
    assert [r["round"] for r in correction.result["rounds"]] == [1, 2] and correction.round == 2
    second = correction.result["rounds"][1]
    assert second["concepts"] == [concept + expected, *split]
    assert second["audit"] == correction.reaudit_id != first_reaudit
    assert correction.result["correction"]["shortcut"]["concepts"] == [concept + expected, *split]
    assert correction.result["verdict"]["passed"] == second["passed"]
    # each round's probe is a version of the audited one; the correction's is the last round's
    assert correction.new_probe_id == second["probe"] != first_probe
    assert Probe.objects.get(pk=first_probe).parent == audited.probe == correction.new_probe.parent
    assert correction.new_probe.name.endswith(f"(correction {correction.pk}, round 2)")
    assert Audit.objects.get(pk=correction.reaudit_id).context["round"] == 2

    # the page shows each round; the API gives them in the result
    page = web("viewer").get(f"/corrections/{correction.pk}/").content.decode()
    assert page.count('<tr class="round">') == 2 and f'href="/audits/{first_reaudit}/"' in page
    assert f"latent{'s' if len(expected) > 1 else ''} {', '.join(map(str, expected))} tracking the concept" in page
    assert page.count("corrected in round 2") == 1
    body = client_for("viewer").get(f"/api/v1/corrections/{correction.pk}/").json()
    assert [r["round"] for r in body["result"]["rounds"]] == [1, 2]


def test_one_round_stops_after_its_reaudit_whatever_it_still_flags(audited, users, queue, monkeypatch,
                                                                  django_capture_on_commit_callbacks):
    from workers.engine import correct_audit

    monkeypatch.setattr(correct_audit, "tracking_latents", lambda run, store, concepts: [
        {"concept": list(c), "latents": {str(i): 0.9 for i in range(run.sae.n_latents)}} for c in concepts])
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk],
                                   options={"rounds": 1})
    correction = run_correction_and_reaudit(correction, django_capture_on_commit_callbacks)
    assert correction.status == Status.SUCCEEDED and len(correction.result["rounds"]) == 1
