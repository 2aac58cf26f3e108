"""Adding a dataset by reference in real headless Chromium: a folder an admin did not allow is refused next to
the location field, then WebDataset shards in an allowed folder are registered and listed as read by
reference. Screenshots of both are saved under ``TEST_ARTIFACTS_DIR``."""
import pytest

from .test_browser import ARTIFACTS, browser, sign_in  # noqa: F401 (browser: the fixture)
from .test_dataset_references import write_shards

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_member_adds_webdataset_shards_from_an_allowed_folder(browser, live_server, project, assets,  # noqa: F811
                                                                 tmp_path, settings):
    root = tmp_path / "shared-data"
    shards = write_shards(assets["dataset"], root / "lesions-wds")
    settings.DATASET_ROOTS = [str(root)]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    sign_in(page, live_server.url, "member")
    page.click(f"text={project.name}")
    page.click("text=Add a dataset")
    page.fill("#id_name", "lesions as shards")
    page.select_option("#id_source", "folder")
    page.fill("#id_location", str(tmp_path))  # above the allowed folder
    page.click("form.stacked button[type=submit]")
    error = page.wait_for_selector("#field-location .errorlist")
    assert "is not inside a folder an admin allowed for datasets" in error.inner_text()
    page.screenshot(path=str(ARTIFACTS / "dataset-by-reference-refused.png"), full_page=True)

    page.fill("#id_location", str(shards))
    page.click("form.stacked button[type=submit]")
    page.wait_for_selector("text=Dataset 'lesions as shards' registered, read from its folder")
    row = page.inner_text("table:has-text('lesions as shards')")
    assert "32 images" in row and "by reference: folder" in row and "WebDataset" in row
    page.screenshot(path=str(ARTIFACTS / "dataset-by-reference.png"), full_page=True)
