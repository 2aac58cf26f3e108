"""Making a corrected probe in real headless Chromium, against a live server, a real Celery worker, Redis and
PostgreSQL: a member reviews a flag as a confirmed shortcut, makes a corrected probe from the report, watches the
job and its re-audit finish, reads the before/after table, the diff and the training images behind the shortcut
(a reweighted fit on the probe's training split), downloads that list and the new probe; the report and the project
page then show the correction. Screenshots go to ``TEST_ARTIFACTS_DIR`` (correction*.png).
"""
import re
import time

import pytest

from audit_service.audits.models import Audit, Correction, Status
from audit_service.audits.services import create_audit

from .test_browser import ARTIFACTS, OPTIONS, browser, sign_in  # noqa: F401 (browser: the fixture)
from .test_integration import purge_queues, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def wait_for(audit: Audit, seconds: float = 600) -> Audit:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        audit.refresh_from_db()
        if audit.is_finished:
            return audit
        time.sleep(0.5)
    raise AssertionError(f"audit {audit.pk} did not finish within {seconds} s ({audit.stage} {audit.percent} %)")


def audited_by_worker(project, users, registered, dataset=None) -> Audit:
    """A fast audit of the registered inputs (another ``dataset`` of the project if given), run by the test's
    worker to the end."""
    audit = wait_for(create_audit(project=project, user=users["member"], clip_model=registered["model"],
                                  probe=registered["probe"], dataset=dataset or registered["dataset"],
                                  options={**OPTIONS, "general_vocabulary": False}))
    assert audit.status == Status.SUCCEEDED, audit.error
    return audit


def member_page(browser, base: str):  # noqa: F811 (browser: the fixture's value)
    """(context, page) of the member, signed in, downloads accepted."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, base, "member")
    return context, page


def test_a_member_makes_a_corrected_probe_from_the_report(browser, live_server, project, users, registered,  # noqa: F811
                                                          tmp_path):
    base = live_server.url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    purge_queues()
    worker = start_worker(tmp_path, "correction")
    try:
        audit = audited_by_worker(project, users, registered)
        context, page = member_page(browser, base)
        page.goto(f"{base}/audits/{audit.pk}/report/")

        # review the top probe flag as a confirmed shortcut: the correction form preselects it
        flag = audit.flags.filter(head="probe").order_by("class_name", "rank").first()
        card = page.locator(f"#flag-{flag.pk}")
        card.locator("summary").click()
        card.locator("select[name=verdict]").select_option("confirmed_shortcut")
        card.locator("button[type=submit]").click()
        page.wait_for_selector("text=Review saved")
        form = page.locator("#make-correction")
        if form.get_attribute("open") is None:
            form.locator("summary").click()
        boxes = form.locator("input[name=flags]")
        checked = [int(boxes.nth(i).get_attribute("value")) for i in range(boxes.count()) if boxes.nth(i).is_checked()]
        assert checked == [flag.pk]
        # reweighted on the probe's training split (the registered dataset stands in for it)
        form.locator("select[name=method]").select_option("reweight")
        form.locator("select[name=training_dataset]").select_option(str(registered["dataset"].pk))
        form.screenshot(path=str(ARTIFACTS / "correction-form.png"))
        page.click("#make-correction-button")
        page.wait_for_url(re.compile(r".*/corrections/\d+/$"))
        correction_id = int(re.search(r"/corrections/(\d+)/$", page.url).group(1))

        # the page follows the job and its re-audit, then reloads with the result
        page.wait_for_selector("#result .correction-table", timeout=600_000)
        log = (tmp_path / "correction.log").read_text()
        correction = Correction.objects.get(pk=correction_id)
        assert correction.status == Status.SUCCEEDED, (correction.error, log[-3000:])
        assert page.inner_text("#status") == "succeeded"
        table = page.inner_text("#result .correction-table")
        assert "all images" in table and f"latent {flag.latent} active" in table and "Old probe" in table
        assert "flags gone" in page.inner_text("#result .diff-summary")
        assert correction.result["method"] == "reweight" and "Method: reweight" in page.inner_text("#result")
        # the data behind the shortcut: per class counts on the page, the whole list as CSV
        data = correction.result["correction"]["training_data"]
        training = page.inner_text("#result .training-data")
        assert f"{data['with_concept']} have the corrected concept" in training
        assert all(name in page.inner_text("#result .training-table") for name in data["classes"])
        page.locator("#result .training-data").screenshot(path=str(ARTIFACTS / "correction-training-data.png"))
        with page.expect_download() as info:
            page.click("#result >> text=Download the list (CSV)")
        listing = tmp_path / info.value.suggested_filename
        info.value.save_as(listing)
        lines = listing.read_text().splitlines()
        assert lines[0] == "image,class,activation" and len(lines) == len(data["rows"]) + 1
        page.screenshot(path=str(ARTIFACTS / "correction.png"), full_page=True)

        with page.expect_download() as info:
            page.click("#result >> text=Download probe")
        path = tmp_path / info.value.suggested_filename
        info.value.save_as(path)
        assert path.suffix == ".npz" and path.read_bytes() == correction.new_probe.file.open("rb").read()

        # the original report lists the correction and links the reviewed flag to it; the project shows the version
        page.goto(f"{base}/audits/{audit.pk}/report/")
        assert f"Correction #{correction_id}" in page.inner_text("#corrections ~ .correction")
        assert f"Answered by correction #{correction_id}" in page.inner_text(f"#flag-{flag.pk}")
        page.goto(f"{base}/projects/{project.pk}/")
        assert f"version 2 of {registered['probe'].name}: correction #{correction_id}" in page.inner_text("#probes")
        context.close()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        from django.db import connections

        connections.close_all()


def test_a_correction_in_rounds_shows_each_round_on_its_page(browser, live_server, project, users, registered,  # noqa: F811
                                                             monkeypatch):
    """Two rounds run through the real tasks (in this process; every other latent made to track the corrected
    concept, so the first re-audit's other probe flags join it), then read in the browser: the rounds table with
    each round's latents, accuracy, hurt slices' gaps, re-audit and the latents it added."""
    from workers import corrections as correction_tasks
    from workers import tasks
    from workers.celery import app as celery_app
    from workers.engine import correct_audit

    from audit_service.audits.corrections import create_correction

    sent = []
    monkeypatch.setattr(celery_app, "send_task", lambda name, args=None, **kw: sent.append((name, args[0])))
    monkeypatch.setattr(correct_audit, "tracking_latents", lambda run, store, concepts: [
        {"concept": list(c), "images_with": 1, "share_needed": 0.8,
         "latents": {str(i): 0.9 for i in range(run.sae.n_latents) if i not in c}} for c in concepts])
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"],
                         options={**OPTIONS, "general_vocabulary": False})
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    flag = audit.flags.filter(head="probe").order_by("-share").first()
    correction = create_correction(audit=audit, user=users["member"], flag_ids=[flag.pk],
                                   options={"directions": "removal", "rounds": 2})
    for _ in range(2):
        correction_tasks.run_correction.apply(args=[correction.pk])
        correction.refresh_from_db()
        assert correction.stage == "reaudit", correction.error
        tasks.run_audit.apply(args=[correction.reaudit_id])
        correction.refresh_from_db()
        if correction.is_finished:
            break
    assert correction.status == Status.SUCCEEDED, correction.error
    rounds = correction.result["rounds"]
    assert len(rounds) == 2, "the first re-audit flagged nothing else, so no second round ran"

    context, page = member_page(browser, live_server.url)
    page.goto(f"{live_server.url}/corrections/{correction.pk}/")
    table = page.locator("#result .rounds-table")
    rows = table.locator("tr.round")
    assert rows.count() == 2
    first, second = rows.nth(0).inner_text(), rows.nth(1).inner_text()
    added = ", ".join(str(i) for i in rounds[0]["added"][0])
    assert "corrected in round 2" in first and added in first and f"audit #{rounds[0]['audit']}" in first
    assert second.startswith("2") and added in second and f"audit #{correction.reaudit_id}" in second
    table.screenshot(path=str(ARTIFACTS / "correction-rounds.png"))
    page.screenshot(path=str(ARTIFACTS / "correction-rounds-page.png"), full_page=True)
    context.close()
    from django.db import connections

    connections.close_all()


def test_a_member_corrects_along_the_datasets_column_from_the_report(browser, live_server, project, users,  # noqa: F811
                                                                     registered, assets, tmp_path):
    """The form offers the audited dataset's labels.csv columns; along "ruler" the correction removes the column's
    direction in one round and its page says so."""
    from .test_correction_column import register_ruled

    base = live_server.url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    purge_queues()
    worker = start_worker(tmp_path, "correction-column")
    try:
        audit = audited_by_worker(project, users, registered,
                                  register_ruled(project, users["member"], assets, tmp_path))
        flag = audit.flags.filter(head="probe").order_by("class_name", "rank").first()
        context, page = member_page(browser, base)
        page.goto(f"{base}/audits/{audit.pk}/report/")
        form = page.locator("#make-correction")
        if form.get_attribute("open") is None:
            form.locator("summary").click()
        form.locator(f"input[name=flags][value='{flag.pk}']").check()
        options = form.locator("#correction-column option")
        assert [options.nth(i).get_attribute("value") for i in range(options.count())] == [
            "", "ruler", "everywhere", "site"]
        form.locator("#correction-column").select_option("ruler")
        form.screenshot(path=str(ARTIFACTS / "correction-column-form.png"))
        page.click("#make-correction-button")
        page.wait_for_url(re.compile(r".*/corrections/\d+/$"))
        correction_id = int(re.search(r"/corrections/(\d+)/$", page.url).group(1))
        page.wait_for_selector("#result .correction-table", timeout=600_000)
        correction = Correction.objects.get(pk=correction_id)
        assert correction.status == Status.SUCCEEDED, (correction.error,
                                                       (tmp_path / "correction-column.log").read_text()[-3000:])
        assert correction.options["column"] == "ruler" and len(correction.result["rounds"]) == 1
        assert correction.result["correction"]["shortcut"]["estimate"] == "column"
        assert "the direction of the images labels.csv column “ruler” marks" in page.inner_text("#result")
        assert "no rounds left" not in page.inner_text("#result .rounds-table")
        page.screenshot(path=str(ARTIFACTS / "correction-column.png"), full_page=True)
        context.close()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        from django.db import connections

        connections.close_all()
