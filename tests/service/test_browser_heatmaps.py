"""Heatmaps and the explanation of one image in real headless Chromium, against a live server, a real Celery
worker, Redis and PostgreSQL: a member turns heatmaps on in the report (and in its offline download, with every
request blocked), then uploads an image to explain, reads its top latents with their heatmaps and their large maps
beside the image, and finds them in the offline report. Screenshots go to ``TEST_ARTIFACTS_DIR`` (heatmaps*.png,
explanation*.png).
"""
import re
import shutil

import pytest
from PIL import Image

from audit_service.audits.models import Explanation, Status

from .test_browser import ARTIFACTS, browser  # noqa: F401 (browser: the fixture)
from .test_browser_correction import audited_by_worker, member_page
from .test_integration import purge_queues, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_heatmaps_in_the_report_and_an_uploaded_image_explained(browser, live_server, project, users,  # noqa: F811
                                                                registered, tmp_path):
    base = live_server.url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    purge_queues()
    worker = start_worker(tmp_path, "heatmaps")
    try:
        audit = audited_by_worker(project, users, registered)
        context, page = member_page(browser, base)
        page.goto(f"{base}/audits/{audit.pk}/report/")
        card = page.locator(".flagcard").first
        assert card.locator("img.heat").count() > 0
        assert not card.locator("img.heat").first.is_visible()  # off until switched on
        page.click("label[for=show-heatmaps]")
        assert card.locator("img.heat").first.is_visible() and not card.locator("img.plain.has-heat").first.is_visible()
        widths = card.locator("img.heat").evaluate_all("els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths)
        card.screenshot(path=str(ARTIFACTS / "heatmaps-flag.png"))

        # the offline download carries them and switches them without a script
        with page.expect_download() as info:
            page.click("#downloads >> text=HTML report")
        report = tmp_path / info.value.suggested_filename
        info.value.save_as(report)
        offline = browser.new_context(offline=True)
        requests = []
        offline.route("**/*", lambda route: (requests.append(route.request.url), route.continue_()
                                             if route.request.url.startswith("file:") else route.abort()))
        opened = offline.new_page()
        opened.goto(report.resolve().as_uri())
        opened.click("label[for=show-heatmaps]")
        heat = opened.locator(".flagcard").first.locator("img.heat").first
        assert heat.is_visible() and heat.evaluate("e => e.naturalWidth") > 0
        assert [u for u in requests if not u.startswith("file:")] == []
        opened.locator(".flagcard").first.screenshot(path=str(ARTIFACTS / "heatmaps-offline.png"))
        shutil.copy(report, ARTIFACTS / "report-heatmaps.html")
        offline.close()

        # explain an uploaded image
        upload = tmp_path / "lesion.png"
        Image.new("RGB", (64, 64), (150, 95, 70)).save(upload)
        page.goto(f"{base}/audits/{audit.pk}/report/#explain")
        page.set_input_files("#explain-form input[name=image]", str(upload))
        page.click("#explain-button")
        page.wait_for_url(re.compile(r".*/explanations/\d+/$"))
        explanation_id = int(re.search(r"/explanations/(\d+)/$", page.url).group(1))
        page.wait_for_selector("#predictions", timeout=300_000)
        explanation = Explanation.objects.get(pk=explanation_id)
        assert explanation.status == Status.SUCCEEDED, explanation.error
        assert "uploaded image lesion.png" in page.inner_text("h1 + p")
        rows = page.locator(".explain-table tr td.explain-heat img.heat")
        assert rows.count() > 0 and rows.first.is_visible()
        assert all(w > 0 for w in rows.evaluate_all("els => els.map(e => e.naturalWidth)"))
        probe = explanation.result["heads"]["probe"]
        assert f"{probe['prediction']}" in page.inner_text("#predictions")
        page.screenshot(path=str(ARTIFACTS / "explanation.png"), full_page=True)

        # the large maps beside the image, readable at the model's crop size
        gallery = page.locator(".explain-gallery figure.gallery-map img")
        assert gallery.count() > 0 and gallery.first.is_visible()
        assert set(gallery.evaluate_all("els => els.map(e => e.naturalWidth)")) == {224}
        shown = gallery.count()
        page.locator(".explain-gallery").screenshot(path=str(ARTIFACTS / "explanation-maps.png"))

        # the offline report carries the finished explanation with its maps
        page.goto(f"{base}/audits/{audit.pk}/report/")
        with page.expect_download() as info:
            page.click("#downloads >> text=HTML report")
        again = tmp_path / "again.html"
        info.value.save_as(again)
        offline = browser.new_context(offline=True)
        opened = offline.new_page()
        opened.goto(again.resolve().as_uri())
        section = opened.locator("#explained")
        assert f"Explanation #{explanation_id}" in opened.inner_text("body")
        assert section.is_visible()
        maps = opened.locator(".explain-gallery figure.gallery-map img")
        assert maps.count() == shown and maps.first.evaluate("e => e.naturalWidth") == 224
        opened.locator(".explain-gallery").first.screenshot(path=str(ARTIFACTS / "explanation-offline.png"))
        offline.close()
        context.close()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        from django.db import connections

        connections.close_all()
