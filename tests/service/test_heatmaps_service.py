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
    assert "made by attnlrp, traced back 3 blocks" in page  # the default method, named
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


def test_another_heatmap_method_is_chosen_by_name_and_a_finer_one_gives_finer_maps(project, users, registered, web):
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"],
                         options={**FAST_AUDIT, "heatmap_method": "attnlrp-pixels", "heatmap_cells": 2})
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    grid = registered["model"].model_config["vision_cfg"]
    cells = grid["image_size"] // grid["patch_size"] * 2
    maps = [m for f in audit.flags.all() for m in f.heatmaps.values()]
    assert maps and all(len(m) == cells and len(m[0]) == cells for m in maps)
    assert "made by attnlrp-pixels, 2 cells per patch side" in web("viewer").get(f"/audits/{audit.pk}/report/").content.decode()


@pytest.mark.parametrize("options, message", [
    ({"heatmap_method": "gradcam"}, "heatmap_method"),
    ({"heatmap_cells": 0}, "heatmap_cells"),
    ({"heatmap_blocks": 0}, "heatmap_blocks"),
])
def test_a_heatmap_option_that_cannot_be_used_is_refused_before_anything_is_queued(project, users, registered, options,
                                                                                   message):
    from audit_service.audits.models import Audit
    from audit_service.registry.services import RegistrationError

    before = Audit.objects.count()
    with pytest.raises(RegistrationError, match=message):
        create_audit(project=project, user=users["member"], clip_model=registered["model"],
                     probe=registered["probe"], dataset=registered["dataset"], options={**FAST_AUDIT, **options})
    assert Audit.objects.count() == before
