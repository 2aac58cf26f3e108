"""The web UI with Django's test client: pages, forms with their errors, the report, downloads, review, roles."""
import csv
import io
import json
import re

import pytest
from django.test import Client

from audit_service.audits.models import Audit, Latent, Review, Status
from audit_service.audits.services import create_audit
from workers import tasks

from .conftest import FAST_AUDIT, upload
from .results import RULER_SUMMARY, build_result, stored_audit, without_new_keys

pytestmark = pytest.mark.django_db

# thresholds that flag every relevant latent not labelled as its class, so the tiny audit has flags to show
FLAGGING_AUDIT = {**FAST_AUDIT, "flag_max_alignment": 1.0, "flag_min_share": 0.0}


@pytest.fixture
def finished(project, users, registered):
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"], options=FLAGGING_AUDIT)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.flags.exists()
    return audit


# --------------------------------------------------------------------------- pages and forms

def test_pages_need_a_signed_in_user(web, project):
    response = web(None).get(f"/projects/{project.pk}/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    page = web(None).get("/accounts/login/")
    assert page.status_code == 200 and b"Sign in" in page.content


def test_signing_in_with_the_form_shows_the_users_projects(users, project):
    client = Client()
    response = client.post("/accounts/login/", {"username": "viewer", "password": "pw-viewer"}, follow=True)
    assert response.status_code == 200
    assert b"Dermatology" in response.content and b"viewer" in response.content


def test_registration_forms_create_objects_and_show_the_services_errors_next_to_the_field(web, project, assets):
    client = web("member")
    bad = client.post(f"/projects/{project.pk}/models/new/", {
        "name": "tiny", "layer": -1, "token": "cls", "model_config": upload(assets["config"]),
        "checkpoint": upload(assets["probe"], "weights.safetensors")})
    assert bad.status_code == 200
    field = re.search(rb'id="field-checkpoint".*?</div>', bad.content, re.S).group(0)
    assert b"errorlist" in field  # the refusal sits next to the checkpoint field
    ok = client.post(f"/projects/{project.pk}/models/new/", {
        "name": "tiny", "layer": -1, "token": "cls", "model_config": upload(assets["config"]),
        "checkpoint": upload(assets["checkpoint"])})
    assert ok.status_code == 302 and project.clip_models.count() == 1
    model = project.clip_models.get()

    probe = client.post(f"/projects/{project.pk}/probes/new/", {"name": "p", "clip_model": model.pk,
                                                                "file": upload(assets["probe"])})
    assert probe.status_code == 302 and project.probes.count() == 1

    broken = client.post(f"/projects/{project.pk}/datasets/new/", {
        "name": "d", "archive": upload(assets["config"], "data.zip")})
    field = re.search(rb'id="field-archive".*?</div>', broken.content, re.S).group(0)
    assert b"errorlist" in field and project.datasets.count() == 0
    dataset = client.post(f"/projects/{project.pk}/datasets/new/", {"name": "d",
                                                                    "archive": upload(assets["dataset"])})
    assert dataset.status_code == 302 and project.datasets.count() == 1


def test_the_audit_form_submits_an_audit_with_its_options_and_explains_bad_json(web, project, registered,
                                                                               sent):
    client = web("member")
    form = {"clip_model": registered["model"].pk, "probe": registered["probe"].pk,
            "dataset": registered["dataset"].pk, "n_latents": 32, "k": 4, "causal": "on",
            "expected_concepts": "melanoma: melanoma, irregular mole\nnevus: nevus"}
    bad = client.post(f"/projects/{project.pk}/audits/new/", {**form, "options": "{not json"})
    assert bad.status_code == 200 and b"not valid JSON" in bad.content and not Audit.objects.exists()
    refused = client.post(f"/projects/{project.pk}/audits/new/", {**form, "options": '{"flag_min_share": 7}'})
    assert b"flag_min_share: must be at most 1, got 7" in refused.content and not Audit.objects.exists()
    ok = client.post(f"/projects/{project.pk}/audits/new/", {**form, "options": '{"flag_min_share": 0.03}'})
    audit = Audit.objects.get()
    assert ok.status_code == 302 and ok["Location"] == f"/audits/{audit.pk}/"
    assert audit.config["sae"]["n_latents"] == 32 and audit.config["sae"]["k"] == 4
    assert audit.config["flag_min_share"] == 0.03 and audit.config["general_vocabulary"] is False
    assert audit.config["expected_concepts"] == {"melanoma": ["melanoma", "irregular mole"], "nevus": ["nevus"]}


def test_the_progress_endpoint_reports_stage_percent_elapsed_and_remaining(web, project, users, registered):
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    client = web("viewer")
    assert client.get(f"/audits/{audit.pk}/status.json").json()["status"] == "queued"
    audit.mark_running("attribute", 40.0)
    body = client.get(f"/audits/{audit.pk}/status.json").json()
    assert body["stage"] == "attribute" and body["percent"] == 40.0 and body["elapsed_s"] >= 0
    assert body["remaining_s"] == pytest.approx(body["elapsed_s"] * 1.5, rel=1e-6, abs=1e-6)
    assert body["report_url"] is None and not body["finished"]
    page = client.get(f"/audits/{audit.pk}/")
    assert b'id="bar"' in page.content and b"progress-data" in page.content
    assert b"Cancel audit" not in page.content  # a viewer cannot cancel


# --------------------------------------------------------------------------- the report

def test_the_report_shows_summary_flag_cards_images_and_plots(web, finished):
    response = web("viewer").get(f"/audits/{finished.pk}/report/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="class-summary"' in html and "SAE quality" in html
    flag = finished.flags.first()
    assert f'id="flag-{flag.pk}"' in html and f"Latent {flag.latent}" in html
    assert html.count("<svg") >= 2 * len(finished.result["classes"])  # bars + deletion curves per class
    assert "data:image/png;base64," in html  # the relevance-vs-alignment scatter
    assert "data:image/jpeg;base64," in html  # reference images
    assert "Save review" not in html  # viewers read, they do not review


def test_filters_narrow_the_flags_by_head_class_category_and_verdict(web, finished, users):
    flag = finished.flags.order_by("pk").first()
    Review.objects.create(flag=flag, reviewer=users["member"], verdict="benign")
    client = web("member")

    def shown(**params):
        html = client.get(f"/audits/{finished.pk}/report/", params).content.decode()
        return {int(i) for i in re.findall(r'id="flag-(\d+)"', html)}

    everything = set(finished.flags.values_list("pk", flat=True))
    assert shown() == everything
    assert shown(verdict="benign") == {flag.pk}
    assert shown(verdict="unreviewed") == everything - {flag.pk}
    assert shown(head="zero_shot") == set(finished.flags.filter(head="zero_shot").values_list("pk", flat=True))
    assert shown(class_name=flag.class_name) == set(
        finished.flags.filter(class_name=flag.class_name).values_list("pk", flat=True))
    assert shown(category="no-such-category") == set()


def test_members_review_flags_and_the_history_is_kept_and_shown(web, finished, users):
    flag = finished.flags.first()
    client = web("member")
    first = client.post(f"/audits/{finished.pk}/flags/{flag.pk}/review/", {"verdict": "needs_work", "note": "look"})
    assert first.status_code == 302 and first["Location"].endswith(f"#flag-{flag.pk}")
    client.post(f"/audits/{finished.pk}/flags/{flag.pk}/review/",
                {"verdict": "confirmed_shortcut", "note": "ruler, see refs"})
    assert [r.verdict for r in flag.reviews.all()] == ["confirmed_shortcut", "needs_work"]
    html = client.get(f"/audits/{finished.pk}/report/").content.decode()
    card = html[html.index(f'id="flag-{flag.pk}"'):]
    card = card[:card.index('class="card flagcard"', 10) if 'class="card flagcard"' in card[10:] else len(card)]
    assert "Confirmed shortcut" in card and "ruler, see refs" in card and "Needs work" in card and "look" in card
    invalid = client.post(f"/audits/{finished.pk}/flags/{flag.pk}/review/", {"verdict": "maybe"}, follow=True)
    assert b"The review was not saved" in invalid.content and flag.reviews.count() == 2


def test_a_viewer_cannot_review_and_an_outsider_sees_nothing(web, finished):
    flag = finished.flags.first()
    viewer = web("viewer").post(f"/audits/{finished.pk}/flags/{flag.pk}/review/", {"verdict": "benign"})
    assert viewer.status_code == 403 and not flag.reviews.exists()
    outsider = web("outsider")
    for url in (f"/projects/{finished.project_id}/", f"/audits/{finished.pk}/", f"/audits/{finished.pk}/status.json",
                f"/audits/{finished.pk}/report/", f"/audits/{finished.pk}/latents/",
                f"/audits/{finished.pk}/download/html", f"/audits/{finished.pk}/download/json",
                f"/audits/{finished.pk}/download/latents.csv", f"/audits/{finished.pk}/download/flags.csv"):
        assert outsider.get(url).status_code == 404, url
    assert outsider.post(f"/audits/{finished.pk}/flags/{flag.pk}/review/", {"verdict": "benign"}).status_code == 404
    assert outsider.get(f"/projects/{finished.project_id}/audits/new/").status_code == 404
    assert web("viewer").get(f"/projects/{finished.project_id}/audits/new/").status_code == 403
    assert b"Dermatology" not in outsider.get("/").content


# --------------------------------------------------------------------------- downloads

def test_the_downloaded_html_is_one_self_contained_file(web, finished):
    response = web("viewer").get(f"/audits/{finished.pk}/download/html")
    assert response.status_code == 200 and "attachment" in response["Content-Disposition"]
    html = response.content.decode()
    sources = re.findall(r'\bsrc="([^"]*)"', html)
    assert sources and all(s.startswith("data:") for s in sources)  # every image is embedded
    assert "<link" not in html and "@import" not in html
    assert not re.findall(r"url\((?!#)", html)  # only the SVGs' own clip paths, url(#id)
    assert "<script" not in html  # nothing to fetch, nothing to run
    assert "data:image/jpeg;base64," in html and "<svg" in html
    assert f"Latent {finished.flags.first().latent}" in html


def test_json_and_csv_downloads_hold_the_full_result(web, finished):
    client = web("viewer")
    body = json.loads(client.get(f"/audits/{finished.pk}/download/json").content)
    assert body["report_schema_version"] == 2 and body["result"]["schema_version"] >= 1
    assert len(body["latents"]) == finished.result["sae"]["n_latents"]
    assert len(body["flags"]) == finished.flags.count()
    assert body["audit"]["config"] == finished.config

    latents = list(csv.DictReader(io.StringIO(b"".join(
        client.get(f"/audits/{finished.pk}/download/latents.csv").streaming_content).decode())))
    assert len(latents) == finished.result["sae"]["n_latents"]
    assert {int(r["latent"]) for r in latents} == set(range(finished.result["sae"]["n_latents"]))
    flags = list(csv.DictReader(io.StringIO(b"".join(
        client.get(f"/audits/{finished.pk}/download/flags.csv").streaming_content).decode())))
    assert len(flags) == finished.flags.count()
    assert flags[0]["head"] in ("probe", "zero_shot") and flags[0]["label"]
    assert client.get(f"/audits/{finished.pk}/download/pdf").status_code == 404


def test_reports_of_unfinished_audits_do_not_exist(web, project, users, registered):
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    client = web("member")
    assert client.get(f"/audits/{audit.pk}/report/").status_code == 404
    assert client.get(f"/audits/{audit.pk}/download/json").status_code == 404


def test_pages_stay_bounded_with_30000_latents(web, finished, django_assert_max_num_queries):
    Latent.objects.filter(audit=finished).delete()
    Latent.objects.bulk_create([Latent(audit=finished, latent=i, label=f"concept {i % 97}", clarity=0.5,
                                       frequency=0.01, max_activation=1.0, label_alignment=0.1, references=[])
                                for i in range(30000)], batch_size=5000)
    client = web("viewer")
    with django_assert_max_num_queries(40):
        page = client.get(f"/audits/{finished.pk}/latents/", {"page": 3})
    rows = re.findall(r'<tr><td class="num">(\d+)</td>', page.content.decode())
    assert [int(r) for r in rows] == list(range(100, 150))  # one page of 50, not 30 000
    with django_assert_max_num_queries(60):
        report = client.get(f"/audits/{finished.pk}/report/")
    assert report.status_code == 200 and b"concept 5" not in report.content  # no latent rows on the report


def test_the_api_serves_the_same_downloads_to_token_clients(client_for, finished, project, users, registered):
    api = client_for("viewer")
    html = api.get(f"/api/v1/audits/{finished.pk}/download/html/")
    assert html.status_code == 200 and b"Shortcut audit" in html.content
    assert api.get(f"/api/v1/audits/{finished.pk}/download/json/").json()["report_schema_version"] == 2
    assert api.get(f"/api/v1/audits/{finished.pk}/download/pdf/").status_code == 404
    assert client_for("outsider").get(f"/api/v1/audits/{finished.pk}/download/json/").status_code == 404
    queued = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                          probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    assert api.get(f"/api/v1/audits/{queued.pk}/download/json/").status_code == 409


def test_admins_bulk_review_flags_and_filter_by_latest_verdict(finished, users):
    from django.contrib.auth import get_user_model

    admin_user = get_user_model().objects.create_superuser("admin", password="pw-admin")
    client = Client()
    client.force_login(admin_user)
    flags = list(finished.flags.order_by("pk"))
    first, rest = flags[0], flags[1:]
    response = client.post("/admin/audits/flag/", {"action": "mark_benign",
                                                   "_selected_action": [f.pk for f in flags]}, follow=True)
    assert response.status_code == 200 and f"{len(flags)} flags marked benign".encode() in response.content
    client.post("/admin/audits/flag/", {"action": "mark_confirmed_shortcut", "_selected_action": [first.pk]})
    assert [r.verdict for r in first.reviews.all()] == ["confirmed_shortcut", "benign"]  # history kept
    assert all(r.reviewer == admin_user for r in Review.objects.all())

    def listed(**params):
        html = client.get("/admin/audits/flag/", params).content.decode()
        return {int(i) for i in re.findall(r'name="_selected_action" value="(\d+)"', html)}

    assert listed(verdict="confirmed_shortcut") == {first.pk}
    assert listed(verdict="benign") == {f.pk for f in rest}
    assert listed(verdict="unreviewed") == set()
    assert listed(class_name__exact=first.class_name, category__exact=first.category) == {
        f.pk for f in flags if f.class_name == first.class_name and f.category == first.category}


# --------------------------------------------------------------------------- measured harm and confirmation

@pytest.fixture
def measured(project, users, registered):
    """A succeeded audit whose result has measured harm, confirmation, label confidence, slices (hand-built)."""
    return stored_audit(project, users["member"], registered)


def flag_card(html: str, flag) -> str:
    start = html.index(f'id="flag-{flag.pk}"')
    end = html.find('class="card flagcard"', start)
    return html[start:end if end > 0 else len(html)]


def harm_cells(card: str) -> dict:
    """Head -> [(percent, n), ...] from a card's harm table."""
    table = re.search(r'<table class="harm">.*?</table>', card, re.S).group(0)
    return {head: re.findall(r'<td class="num">([^ <]+) <span class="muted">n=(\d+)</span></td>', cells)
            for head, cells in re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", table, re.S)}


def test_a_flag_card_shows_the_harm_table_the_confirmation_and_what_the_latent_fires_on(web, measured):
    html = web("viewer").get(f"/audits/{measured.pk}/report/").content.decode()
    ruler = flag_card(html, measured.flags.get(head="probe", class_name="melanoma"))
    assert harm_cells(ruler) == {"Linear probe": [("96%", "25"), ("33%", "15"), ("81%", "16"), ("2%", "24")],
                                 "Zero-shot": [("71%", "25"), ("74%", "15"), ("20%", "16"), ("22%", "24")]}
    for column in ("melanoma with it: accuracy", "melanoma without it: accuracy", "others with it called melanoma",
                   "others without it called melanoma"):
        assert column in ruler
    assert RULER_SUMMARY in ruler
    assert "confirmed shortcut: measured harm" in ruler and "causally confirmed" not in html
    assert "fires on ruler=1, AUROC 0.97; site=head, AUROC 0.61; site=back, AUROC 0.55" in ruler
    assert "age_over_60" not in ruler  # the top 3 only
    assert "concept spread over latents 0, 3 (summed share)" in ruler
    assert "(similar latents: 6%)" in ruler
    assert "others fixed by removing it <b>9</b> / 13 (similar latents fix 8%)" in ruler
    assert "“a ruler”" in ruler and "(confidence 0.91)" in ruler
    assert ("2.5 SD above the next concept of another meaning, “hair”; also “a measuring scale”; the same meaning "
            "in 91 % of resamples of its reference images.") in ruler

    unlabelled = flag_card(html, measured.flags.get(head="probe", class_name="nevus"))
    # an unnamed latent shows what it likely is, and why it is not named
    assert "likely “hair”, unlabelled" in unlabelled and "(confidence 0.12)" in unlabelled
    assert ("likely “hair”, not named: 0.4 SD above the next concept of another meaning, “kite”; no other phrasing "
            "of it among the closest concepts; the same meaning in 24 % of resamples") in unlabelled
    assert "relied on, no measured harm" in unlabelled
    assert "fires on" not in unlabelled and "concept spread" not in unlabelled  # nothing to say, nothing shown
    zero_shot = flag_card(html, measured.flags.get(head="zero_shot"))
    assert "not confirmed" in zero_shot and "measured harm" not in zero_shot.replace("no measured harm", "")


def test_the_report_shows_accuracy_per_slice_and_the_dataset_that_trained_the_sae(web, measured):
    html = web("viewer").get(f"/audits/{measured.pk}/report/").content.decode()
    table = re.search(r'<table class="slices" id="slice-ruler">.*?</table>', html, re.S).group(0)
    rows = {value: re.findall(r'<td class="num">([^<]+)</td>', cells)
            for value, cells in re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", table, re.S)}
    assert rows["1"] == ["41", "0.680", "0.750", "0.960 / 0.700", "0.400 / 0.800"]
    assert rows["0"] == ["39", "0.770", "0.800", "0.330 / 0.740", "0.980 / 0.850"]
    sae = re.search(r'<p class="small" id="sae-dataset">(.*?)</p>', html, re.S).group(1)
    assert "ISIC archive, unlabelled" in sae and "5000 images" in sae
    summary = re.search(r'<table id="class-summary">.*?</table>', html, re.S).group(0)
    melanoma = re.search(r"<tr><td>melanoma</td>.*?</tr>", summary, re.S).group(0)
    assert "Confirmed / measured harm" in summary and '<td class="num">1 / 1</td>' in melanoma


def test_the_downloaded_html_shows_the_same_harm_confirmation_and_slices(web, measured):
    html = web("viewer").get(f"/audits/{measured.pk}/download/html").content.decode()
    ruler = flag_card(html, measured.flags.get(head="probe", class_name="melanoma"))
    assert harm_cells(ruler)["Linear probe"][1] == ("33%", "15")
    assert "confirmed shortcut: measured harm" in ruler and RULER_SUMMARY in ruler
    assert "likely “hair”, unlabelled" in html and 'id="slice-ruler"' in html
    assert "<script" not in html


def test_the_flags_csv_has_confirmation_measured_harm_and_label_confidence(web, measured):
    text = b"".join(web("viewer").get(f"/audits/{measured.pk}/download/flags.csv").streaming_content).decode()
    header = next(csv.reader(io.StringIO(text)))
    assert header[:20] == ["head", "class_name", "rank", "latent", "label", "category", "share", "probe_share",
                           "zero_shot_share", "label_alignment", "expected_alignment", "clarity", "confirmed",
                           "ablation_flips", "ablation_images", "insertion_flips_to_class", "insertion_images",
                           "latest_verdict", "latest_note", "latest_reviewer"]  # old columns keep their places
    rows = {(r["head"], r["class_name"]): r for r in csv.DictReader(io.StringIO(text))}
    ruler = rows[("probe", "melanoma")]
    assert (ruler["confirmation_status"], ruler["harm_measured"], ruler["confirmed"]) == ("confirmed", "true", "true")
    assert [ruler[f"probe_{c}"] for c in ("accuracy_with", "accuracy_without", "others_called_with",
                                          "others_called_without")] == ["0.96", "0.333333", "0.8125", "0.0208333"]
    assert [ruler[f"zero_shot_{c}"] for c in ("accuracy_with", "accuracy_without", "others_called_with",
                                              "others_called_without")] == ["0.71", "0.74", "0.2", "0.22"]
    assert (ruler["label_confidence"], ruler["closest_concept"], ruler["ablation_flips"]) == ("0.91", "a ruler", "10")
    unlabelled = rows[("probe", "nevus")]
    assert (unlabelled["confirmation_status"], unlabelled["harm_measured"], unlabelled["confirmed"]) == (
        "relied_on_no_harm", "false", "false")
    assert (unlabelled["label"], unlabelled["closest_concept"], unlabelled["label_confidence"]) == (
        "unlabelled", "hair", "0.12")
    assert [ruler[c] for c in ("label_runner_up", "label_margin", "label_agreeing", "label_resampled")] == [
        "hair", "2.5", "a measuring scale", "0.91"]


def test_a_result_from_before_harm_was_measured_still_stores_renders_and_downloads(web, project, users,
                                                                                  registered):
    audit = stored_audit(project, users["member"], registered, without_new_keys(build_result()))
    assert (audit.flags.count(), audit.latents.count()) == (3, 4)
    client = web("viewer")
    html = client.get(f"/audits/{audit.pk}/report/").content.decode()
    ruler = flag_card(html, audit.flags.get(head="probe", class_name="melanoma"))
    assert "“a ruler”" in ruler and "confidence" not in ruler
    assert 'class="harm"' not in ruler and "fires on" not in ruler and "concept spread" not in ruler
    assert "predictions flip, harm not measured" in ruler  # its engine's "confirmed", not a confirmed shortcut
    assert 'id="slices"' not in html and "The SAE was trained on the audited dataset." in html
    rows = list(csv.DictReader(io.StringIO(b"".join(
        client.get(f"/audits/{audit.pk}/download/flags.csv").streaming_content).decode())))
    assert len(rows) == 3 and all(r["confirmation_status"] == "" and r["harm_measured"] == "" and
                                  r["probe_accuracy_with"] == "" for r in rows)
    body = json.loads(client.get(f"/audits/{audit.pk}/download/json").content)
    assert all(f["harm"] is None and f["confirmation"]["status"] == "" for f in body["flags"])
    assert client.get(f"/audits/{audit.pk}/download/html").status_code == 200


def test_a_latent_that_fires_where_a_column_is_absent_reads_as_its_zero_value():
    from audit_service.audits.report import metadata_hits

    hits = metadata_hits({"ruler": 0.08, "hair": 0.7, "site=head": 0.2, "age": 0.5})
    assert hits == [{"name": "ruler=0", "auroc": pytest.approx(0.92)},
                    {"name": "not site=head", "auroc": pytest.approx(0.8)},
                    {"name": "hair=1", "auroc": pytest.approx(0.7)}]
