"""The web UI in real headless Chromium, against a live server, a real Celery worker, Redis and PostgreSQL.

A member signs in, registers a model, a probe and a dataset through the forms, submits an audit, watches the
progress bar reach 100 %, opens the report, reviews a flag and downloads every format; the downloaded HTML is
then opened with the network cut off. A viewer reads the report without review controls. Screenshots of the
progress page and the report are saved under ``TEST_ARTIFACTS_DIR`` (default ``var/test-artifacts``).
"""
import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from audit_service.audits.models import Review

from .test_integration import purge_queues, require_real_services, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "var" / "test-artifacts"))
# a fast audit whose thresholds flag every relevant latent that is not labelled as its class
OPTIONS = {"sae": {"steps": 150}, "faithfulness_max_images": 8, "faithfulness_steps": 4, "batch_size": 16,
           "flag_max_alignment": 1.0, "flag_min_share": 0.0, "flag_without_harm": True}


def require_chromium():
    if not Path(CHROMIUM).exists():
        message = f"needs Chromium at {CHROMIUM} (apt-get install chromium); `bash .ci/run` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser():
    require_real_services()
    require_chromium()
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are plain sync code
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


def sign_in(page, base: str, name: str):
    page.goto(f"{base}/accounts/login/")
    page.fill("#id_username", name)
    page.fill("#id_password", f"pw-{name}")
    page.click("form.stacked button[type=submit]")
    page.wait_for_url(f"{base}/")


def test_a_member_runs_an_audit_in_the_browser_and_a_viewer_reads_it(browser, live_server, project, assets,
                                                                     tmp_path):
    base = live_server.url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    purge_queues()
    worker = start_worker(tmp_path, "browser")
    try:
        context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        sign_in(page, base, "member")
        page.click(f"text={project.name}")

        page.click("text=Register a model")
        page.fill("#id_name", "tiny lesion CLIP")
        page.set_input_files("#id_model_config", str(assets["config"]))
        page.set_input_files("#id_checkpoint", str(assets["probe"]))  # wrong file: the form says why
        page.click("form.stacked button[type=submit]")
        error = page.wait_for_selector("#field-checkpoint .errorlist")  # the refusal, next to its field
        assert "checkpoint" in error.inner_text().lower() or "state dict" in error.inner_text().lower()
        page.set_input_files("#id_model_config", str(assets["config"]))
        page.set_input_files("#id_checkpoint", str(assets["checkpoint"]))
        page.click("form.stacked button[type=submit]")
        page.wait_for_selector("text=Model 'tiny lesion CLIP' registered")

        page.click("text=Register a probe")
        page.fill("#id_name", "melanoma probe")
        page.select_option("#id_clip_model", label="tiny lesion CLIP")
        page.set_input_files("#id_file", str(assets["probe"]))
        page.click("form.stacked button[type=submit]")
        page.wait_for_selector("text=Probe 'melanoma probe' registered")

        page.click("text=Add a dataset")
        page.fill("#id_name", "lesions")
        page.set_input_files("#id_archive", str(assets["dataset"]))
        page.click("form.stacked button[type=submit]")
        page.wait_for_selector("text=Dataset 'lesions' uploaded")

        page.click("text=Submit an audit")
        page.uncheck("#id_general_vocabulary")
        page.fill("#id_options", json.dumps(OPTIONS))
        page.click("form.stacked button[type=submit]")
        page.wait_for_url(re.compile(r".*/audits/\d+/$"))
        audit_id = int(re.search(r"/audits/(\d+)/$", page.url).group(1))

        percents = set()
        for _ in range(600):
            text = page.inner_text("#percent")
            percents.add(float(text))
            if page.inner_text("#status") in ("succeeded", "failed", "cancelled"):
                break
            page.wait_for_timeout(500)
        status = page.inner_text("#status")
        log = (tmp_path / "browser.log").read_text()
        assert status == "succeeded", (page.inner_text("#error"), log[-3000:])
        assert float(page.inner_text("#percent")) == 100.0 and page.is_visible("#report-link")
        assert any(0 < p < 100 for p in percents), percents  # the bar moved without reloading the page
        assert page.inner_text("#elapsed") != "–" and page.inner_text("#worker") != "–"
        page.screenshot(path=str(ARTIFACTS / "progress.png"), full_page=True)

        page.click("#report-link")
        page.wait_for_selector("#class-summary")
        page.screenshot(path=str(ARTIFACTS / "report.png"))  # the top: summary, scatter, bars
        page.locator(".flagcard").first.screenshot(path=str(ARTIFACTS / "report-flag.png"))
        assert page.locator(".flagcard").count() >= 1
        images = page.eval_on_selector_all(".thumbs img", "els => els.map(e => e.naturalWidth)")
        assert images and all(w > 0 for w in images)

        card = page.locator(".flagcard").first
        flag_id = int(card.get_attribute("id").split("-")[1])
        card.locator("summary").click()
        card.locator("select[name=verdict]").select_option("confirmed_shortcut")
        card.locator("textarea[name=note]").fill("ruler in every reference image")
        card.locator("button[type=submit]").click()
        page.wait_for_selector("text=Review saved")
        assert page.locator(f"#flag-{flag_id}").inner_text().count("ruler in every reference image") == 1
        assert Review.objects.get(flag_id=flag_id).verdict == "confirmed_shortcut"

        downloads = {}
        for link in ("HTML report", "JSON (full result)", "Latents CSV", "Flags CSV"):
            with page.expect_download() as info:
                page.click(f"#downloads >> text={link}")
            path = tmp_path / info.value.suggested_filename
            info.value.save_as(path)
            downloads[link] = path
        body = json.loads(downloads["JSON (full result)"].read_text())
        assert body["report_schema_version"] == 2 and body["audit"]["id"] == audit_id
        assert any(r["verdict"] == "confirmed_shortcut" for f in body["flags"] for r in f["reviews"])
        latents = list(csv.DictReader(io.StringIO(downloads["Latents CSV"].read_text())))
        assert len(latents) == body["result"]["sae"]["n_latents"]
        flags = list(csv.DictReader(io.StringIO(downloads["Flags CSV"].read_text())))
        assert len(flags) == len(body["flags"])

        # the downloaded report, opened with every network request refused
        offline = browser.new_context(offline=True)
        requests = []
        offline.route("**/*", lambda route: (requests.append(route.request.url), route.continue_()
                                             if route.request.url.startswith("file:") else route.abort()))
        report_page = offline.new_page()
        report_page.goto(downloads["HTML report"].resolve().as_uri())
        report_page.wait_for_selector("#class-summary")
        widths = report_page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths)  # every image is embedded and decodes
        assert report_page.locator("svg").count() >= 2
        assert [u for u in requests if not u.startswith("file:")] == []
        report_page.screenshot(path=str(ARTIFACTS / "report-offline.png"), full_page=False)
        shutil.copy(downloads["HTML report"], ARTIFACTS / "report.html")
        offline.close()
        context.close()

        # a viewer reads the same report but has nothing to review with
        viewer = browser.new_context()
        vpage = viewer.new_page()
        sign_in(vpage, base, "viewer")
        vpage.goto(f"{base}/audits/{audit_id}/report/")
        vpage.wait_for_selector("#class-summary")
        assert vpage.locator("text=Save review").count() == 0
        assert "ruler in every reference image" in vpage.inner_text(f"#flag-{flag_id}")
        viewer.close()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        # Django keys connections by context, and Playwright's event loop makes this test body one of its own:
        # close the session it opened here, or it would outlive the test and block dropping the test database
        from django.db import connections

        connections.close_all()
