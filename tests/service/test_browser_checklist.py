"""A confounder checklist in real headless Chromium, against a live server, a real Celery worker, Redis and
PostgreSQL: an audit submitted with the option ``suspects`` asks its checklist by itself once it succeeds; a member
reads the checklist at the top of the report, asks the shipped dermoscopy list from the report's form, and a build
gates on one suspect with ``clip-audit checklist --fail-on``. Screenshots go to ``TEST_ARTIFACTS_DIR``
(checklist*.png).
"""
import subprocess
import sys
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from audit_service.accounts.models import ApiToken
from audit_service.audits.models import Checklist, Status
from audit_service.audits.services import create_audit
from audit_service.registry.services import register_dataset
from workers.engine.checklist import SHIPPED

from .test_browser import ARTIFACTS, OPTIONS, browser, sign_in  # noqa: F401 (browser: the fixture)
from .test_browser_correction import member_page, wait_for
from .test_checklists import COLUMNS, marked_zip
from .test_cli import REPO
from .test_integration import purge_queues, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SUSPECTS = [{"name": "white corner", "column": "corner"}, {"name": "ruler", "text": "a ruler"}]


def finished_checklist(audit, count: int, seconds: float = 600) -> Checklist:
    """The audit's ``count``-th checklist, once finished."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = list(audit.checklists.order_by("pk"))
        if len(rows) >= count and rows[count - 1].is_finished:
            return rows[count - 1]
        time.sleep(0.5)
    raise AssertionError(f"checklist {count} of audit {audit.pk} did not finish within {seconds} s")


def row_text(page, name: str) -> str:
    return page.locator("#checklist-table tr.checklist-row", has_text=name).first.inner_text()


def test_a_checklist_is_asked_read_in_the_report_and_gates_a_build(browser, live_server, project, users,  # noqa: F811
                                                                   registered, assets, tmp_path):
    base = live_server.url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    purge_queues()
    worker = start_worker(tmp_path, "checklist")
    try:
        path = marked_zip(assets["dataset"], tmp_path / "marked.zip")
        dataset = register_dataset(project=project, user=users["member"], name="marked lesions",
                                   archive=SimpleUploadedFile("marked.zip", path.read_bytes()))
        assert list(dataset.metadata_columns) == list(COLUMNS)
        audit = wait_for(create_audit(project=project, user=users["member"], clip_model=registered["model"],
                                      probe=registered["probe"], dataset=dataset,
                                      options={**OPTIONS, "general_vocabulary": False, "suspects": SUSPECTS}))
        assert audit.status == Status.SUCCEEDED, audit.error
        log = lambda: (tmp_path / "checklist.log").read_text()[-3000:]  # noqa: E731
        first = finished_checklist(audit, 1)
        assert first.status == Status.SUCCEEDED, (first.error, log())
        answers = {a["name"]: a for a in first.result["suspects"]}
        assert set(answers) == {"white corner", "ruler"}

        # the report shows each suspect's verdict at the top
        context, page = member_page(browser, base)
        page.goto(f"{base}/audits/{audit.pk}/report/")
        for name, answer in answers.items():
            text = row_text(page, name)
            assert answer["verdict"] in text and (answer["verdict_class"] or "–") in text
        assert "column corner" in row_text(page, "white corner") and "text “a ruler”" in row_text(page, "ruler")
        page.locator("#checklist-table").screenshot(path=str(ARTIFACTS / "checklist.png"))

        # the shipped dermoscopy list, asked from the report's form
        form = page.locator("#ask-checklist")
        if form.get_attribute("open") is None:
            form.locator("summary").click()
        form.locator("select[name=checklist]").select_option("dermoscopy")
        page.click("#ask-checklist-button")
        page.wait_for_selector("text=asked about")
        second = finished_checklist(audit, 2)
        assert second.status == Status.SUCCEEDED, (second.error, log())
        page.goto(f"{base}/audits/{audit.pk}/report/")
        assert page.locator("#checklist-table tr.checklist-row").count() == len(SHIPPED["dermoscopy"])
        assert "the shipped “dermoscopy” list" in page.inner_text("#checklist + p")
        page.screenshot(path=str(ARTIFACTS / "checklist-report.png"), full_page=True)
        context.close()

        # a build gates on one suspect: exit 1 exactly when the probe relies on it
        key = ApiToken.issue(users["member"], "ci")[1]
        command = [sys.executable, "-m", "audit_service.cli", "--url", base, "--token", key, "checklist",
                   "--poll", "0.5", "--audit", str(audit.pk), "--suspect", "white corner=column:corner",
                   "--fail-on", "white corner", "--out", str(tmp_path / "gate")]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
        third = finished_checklist(audit, 3)
        [answer] = third.result["suspects"]
        relied = answer["verdict"].startswith("relied on")
        assert done.returncode == (1 if relied else 0), done.stdout + done.stderr
        assert answer["verdict"] in done.stdout and (tmp_path / "gate" / f"checklist-{third.pk}.json").is_file()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        from django.db import connections

        connections.close_all()
