"""Flag heatmaps through the service: made with the audit for the images a card shows, stored on the flags,
laid over the thumbnails in the report and in its offline download, and off with ``heatmaps: false``."""
import pytest

from audit_service.audits.models import Status
from audit_service.audits.services import create_audit
from workers import tasks
from workers.engine.explain import REFERENCES_SHOWN

from .conftest import FAST_AUDIT
from .test_corrections import audited  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db


def shown(flag) -> set[str]:
    return set(flag.references[:REFERENCES_SHOWN]) | {t["image"] for t in flag.top_images}


def test_each_flag_has_a_map_for_every_image_its_card_shows_and_the_report_lays_them_over(audited, web):  # noqa: F811
    flags = list(audited.flags.all())
    assert flags
    for flag in flags:
        assert set(flag.heatmaps) == shown(flag), flag.latent
        for grid in flag.heatmaps.values():
            assert len(grid) > 1 and len({len(row) for row in grid}) == 1
            assert all(0 <= v <= 255 for row in grid for v in row)
        # a latent active on its own reference images has mass there: not every map is empty
        assert any(max(max(row) for row in flag.heatmaps[k]) > 0 for k in flag.references[:REFERENCES_SHOWN])
    viewer = web("viewer")
    page = viewer.get(f"/audits/{audited.pk}/report/").content.decode()
    overlays = sum(len(f.references[:REFERENCES_SHOWN]) + len(f.top_images) for f in flags)  # a picture each
    assert 'id="show-heatmaps"' in page and page.count('<img class="heat"') == overlays > 0
    download = viewer.get(f"/audits/{audited.pk}/download/html").content.decode()
    assert download.count('<img class="heat" src="data:image/jpeg;base64,') == page.count('<img class="heat"')


def test_heatmaps_can_be_switched_off(project, users, registered):
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"], options={**FAST_AUDIT,
                                                                                             "heatmaps": False})
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.flags.exists() and all(f.heatmaps == {} for f in audit.flags.all())
