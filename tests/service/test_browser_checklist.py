"""A confounder checklist in real headless Chromium, against a live server, a real Celery worker, Redis and
PostgreSQL: an audit submitted with the option ``suspects`` asks its checklist by itself once it succeeds; a member
reads the checklist at the top of the report (each suspect with the images that show it most, under its latents'
heatmap), asks the shipped dermoscopy list from the report's form, then a suspect by example images uploaded from
the same form, and a build gates on one suspect with ``clip-audit checklist --fail-on``. Screenshots go to
``TEST_ARTIFACTS_DIR`` (checklist*.png).
"""
import csv
import io
import subprocess
import sys
import time
import zipfile

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


def example_files(archive, folder) -> tuple[list[str], list[str]]:
    """Three melanoma and three nevus images of the dataset archive, written to ``folder`` under new names: the
    files a user uploads as examples with and without the white corner."""
    folder.mkdir()
    with zipfile.ZipFile(archive) as z:
        rows = list(csv.DictReader(io.StringIO(z.read("labels.csv").decode())))
        picked = {label: [r["image"] for r in rows if r["label"] == label][:3] for label in ("melanoma", "nevus")}
        out = {}
        for label, names in picked.items():
            out[label] = []
            for i, name in enumerate(names):
                target = folder / f"{label}-example-{i}{name[name.rindex('.'):]}"
                target.write_bytes(z.read(name))
                out[label].append(str(target))
    return out["melanoma"], out["nevus"]


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
        # under each suspect, the images that show it most with its latents' heatmap
        shown = sum(len(a["top_images"]) for a in answers.values())
        assert shown and page.locator("#checklist-table tr.checklist-pictures img").count() == shown
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

        # a suspect named by example images uploaded from the same form
        with_files, without_files = example_files(path, tmp_path / "examples")
        form = page.locator("#ask-checklist")
        if form.get_attribute("open") is None:
            form.locator("summary").click()
        form.locator("input[name=examples_name]").fill("uploaded corner")
        form.locator("input[name=with_images]").set_input_files(with_files)
        form.locator("input[name=without_images]").set_input_files(without_files)
        page.click("#ask-checklist-button")
        page.wait_for_selector("text=asked about")
        uploaded = finished_checklist(audit, 3)
        assert uploaded.status == Status.SUCCEEDED, (uploaded.error, log())
        assert sorted(i.name for i in uploaded.images.all()) == sorted(p.rsplit("/", 1)[-1]
                                                                     for p in with_files + without_files)
        [answer] = uploaded.result["suspects"]
        assert answer["kind"] == "examples" and answer["match"]["latents"]
        page.goto(f"{base}/audits/{audit.pk}/report/")
        text = row_text(page, "uploaded corner")
        assert "examples (3 with, 3 without)" in text and answer["verdict"] in text
        page.locator("#checklist").scroll_into_view_if_needed()
        page.locator("#checklist-table").screenshot(path=str(ARTIFACTS / "checklist-uploaded.png"))
        context.close()

        # a build gates on one suspect: exit 1 exactly when the probe relies on it
        key = ApiToken.issue(users["member"], "ci")[1]
        command = [sys.executable, "-m", "audit_service.cli", "--url", base, "--token", key, "checklist",
                   "--poll", "0.5", "--audit", str(audit.pk), "--suspect", "white corner=column:corner",
                   "--fail-on", "white corner", "--out", str(tmp_path / "gate")]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
        third = finished_checklist(audit, 4)
        [answer] = third.result["suspects"]
        relied = answer["verdict"].startswith("relied on")
        assert done.returncode == (1 if relied else 0), done.stdout + done.stderr
        assert answer["verdict"] in done.stdout and (tmp_path / "gate" / f"checklist-{third.pk}.json").is_file()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        from django.db import connections

        connections.close_all()
