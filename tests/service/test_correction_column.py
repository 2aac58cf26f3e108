"""A correction along a labels.csv column through the service: refused at once when the column is not the audited
dataset's, not 0/1 or marks every image; run in one round with the column's direction; offered on the report's
form with the dataset's columns; shown on the correction's page; sent by the client's ``--column``."""
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from audit_service.audits.corrections import create_correction
from audit_service.audits.models import Correction, Review, Status, Verdict
from audit_service.registry.services import RegistrationError, register_dataset
from clip_audit_client import cli as client_cli
from tests.support.synthetic import with_columns

from .test_checklists import run_audit
from .test_corrections import audited, probe_flag, run_every_round  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db


def register_ruled(project, user, assets, tmp_path):
    """The test dataset registered with extra labels.csv columns: ``ruler`` (0/1, every third image of either
    class), ``everywhere`` (1 on every image) and ``site`` (head/back)."""
    path = with_columns(assets["dataset"], tmp_path / "ruled.zip", {
        "ruler": lambda i, row: int(i % 3 == 0), "everywhere": lambda i, row: 1,
        "site": lambda i, row: "head" if i % 2 else "back"})
    dataset = register_dataset(project=project, user=user, name="ruled lesions",
                               archive=SimpleUploadedFile("ruled.zip", path.read_bytes()))
    assert list(dataset.metadata_columns) == ["ruler", "everywhere", "site"]
    return dataset


@pytest.fixture
def ruled(project, users, registered, assets, tmp_path):
    return run_audit(project, users, registered, register_ruled(project, users["member"], assets, tmp_path))


def test_a_column_that_cannot_mark_the_concept_is_refused_at_once_and_makes_nothing(ruled, users, client_for,
                                                                                   queue):
    flag = probe_flag(ruled)
    for column, words in (("rulers", "dataset 'ruled lesions': labels.csv has no column 'rulers' (its extra "
                                     "columns: everywhere, ruler, site)"),
                          ("site", "column 'site' must hold 0/1 (or true/false) to mark the concept's images; it "
                                   "holds back, head"),
                          ("everywhere", "column 'everywhere' marks every image of dataset 'ruled lesions'")):
        with pytest.raises(RegistrationError, match=words.replace("(", r"\(").replace(")", r"\)")):
            create_correction(audit=ruled, user=users["member"], flag_ids=[flag.pk], options={"column": column})
        response = client_for("member").post(f"/api/v1/audits/{ruled.pk}/corrections/",
                                             {"flags": [flag.pk], "options": {"column": column}}, format="json")
        assert response.status_code == 400 and column in response.content.decode()
    assert Correction.objects.count() == 0 and queue == []


def test_a_correction_along_a_column_removes_its_direction_in_one_round(ruled, users, web, queue,
                                                                       django_capture_on_commit_callbacks):
    flag = probe_flag(ruled)
    correction = create_correction(audit=ruled, user=users["member"], flag_ids=[flag.pk],
                                   options={"column": "ruler", "rounds": 3})
    correction = run_every_round(correction, django_capture_on_commit_callbacks)

    assert correction.status == Status.SUCCEEDED, correction.error
    shortcut = correction.result["correction"]["shortcut"]
    marked = sum(1 for i, _ in enumerate(ruled.dataset.labels()) if i % 3 == 0)
    assert shortcut["estimate"] == "column" and shortcut["n_active"] == [marked]
    assert len(correction.result["rounds"]) == 1  # the column's direction does not change with the concept
    page = web("viewer").get(f"/corrections/{correction.pk}/").content.decode()
    assert "the direction of the images labels.csv column “ruler” marks" in page


def test_the_report_form_offers_the_datasets_columns_and_sends_the_chosen_one(ruled, users, web, queue):
    flag = probe_flag(ruled)
    Review.objects.create(flag=flag, reviewer=users["member"], verdict=Verdict.CONFIRMED_SHORTCUT)
    page = web("member").get(f"/audits/{ruled.pk}/report/").content.decode()
    assert 'name="column"' in page and all(f'<option value="{c}">{c}</option>' in page
                                           for c in ("ruler", "everywhere", "site"))
    response = web("member").post(f"/audits/{ruled.pk}/corrections/new/",
                                  {"flags": [str(flag.pk)], "column": "everywhere"}, follow=True)
    assert "column &#x27;everywhere&#x27; marks every image" in response.content.decode()
    assert Correction.objects.count() == 0
    web("member").post(f"/audits/{ruled.pk}/corrections/new/", {"flags": [str(flag.pk)], "column": "ruler"})
    assert Correction.objects.get().options["column"] == "ruler"


def test_a_dataset_without_extra_columns_offers_no_column(audited, users, web):  # noqa: F811
    assert 'name="column"' not in web("member").get(f"/audits/{audited.pk}/report/").content.decode()


def sent_by_client_correct(monkeypatch, *options: str) -> dict:
    """What ``clip-audit correct --audit 3 OPTIONS`` posts (its flags resolved to [7]), read off a fake API."""
    sent = {}

    class FakeApi:
        def __init__(self, *args):
            pass

        def call(self, method, path, json=None):
            sent.update(json or {})
            raise client_cli.Stop(0, "sent")

    monkeypatch.setattr(client_cli, "Api", FakeApi)
    monkeypatch.setattr(client_cli, "_flag_ids", lambda api, audit, flags: [7])
    args = client_cli.parser().parse_args(["--url", "http://x", "--token", "t", "correct", "--audit", "3", *options])
    with pytest.raises(client_cli.Stop):
        client_cli.correct(args, log=lambda line: None)
    return sent


def test_the_client_sends_its_column_option(monkeypatch):
    sent = sent_by_client_correct(monkeypatch, "--column", "a ruler")
    assert sent["options"]["column"] == "a ruler" and sent["flags"] == [7]
    assert "column" not in sent_by_client_correct(monkeypatch)["options"]
