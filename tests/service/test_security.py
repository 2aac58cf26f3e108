"""Hashed API tokens, CSRF on session writes, the web UI's role matrix, private files, deploy settings."""
import hashlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

from audit_service.accounts.models import ApiToken
from audit_service.audits.models import Review, Status
from audit_service.audits.services import create_audit
from workers import tasks

from .conftest import FAST_AUDIT, upload

pytestmark = pytest.mark.django_db
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- tokens

def test_a_token_is_shown_once_stored_as_a_digest_and_works_until_revoked(users):
    session = APIClient()
    session.force_authenticate(users["member"])
    created = session.post("/api/v1/tokens/", {"name": "ci-pipeline"}, format="json")
    assert created.status_code == 201
    key = created.json()["key"]
    row = ApiToken.objects.get()
    assert row.key_digest == hashlib.sha256(key.encode()).hexdigest()
    assert key not in {str(getattr(row, f.attname)) for f in ApiToken._meta.fields}  # no column holds the key
    assert key.startswith(row.prefix) and len(row.prefix) < len(key) // 3
    listed = session.get("/api/v1/tokens/").json()["results"]
    assert [t["name"] for t in listed] == ["ci-pipeline"] and "key" not in listed[0]

    script = APIClient()
    script.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert script.get("/api/v1/projects/").status_code == 200
    assert APIClient(HTTP_AUTHORIZATION=f"Bearer {key}").get("/api/v1/projects/").status_code == 200
    ApiToken.objects.filter(pk=row.pk).update(last_used_at=None)
    script.get("/api/v1/projects/")
    assert ApiToken.objects.get(pk=row.pk).last_used_at is not None

    wrong = APIClient(HTTP_AUTHORIZATION=f"Token {key[:-1]}x")
    response = wrong.get("/api/v1/projects/")
    assert response.status_code == 401 and response.json()["detail"] == "invalid token"
    assert session.delete(f"/api/v1/tokens/{row.pk}/").status_code == 204
    revoked = script.get("/api/v1/projects/")
    assert revoked.status_code == 401 and "revoked or has expired" in revoked.json()["detail"]


def test_users_see_and_revoke_only_their_own_tokens(users):
    theirs, _ = ApiToken.issue(users["owner"], "owner's")
    client = APIClient()
    client.force_authenticate(users["member"])
    assert client.get("/api/v1/tokens/").json()["count"] == 0
    assert client.delete(f"/api/v1/tokens/{theirs.pk}/").status_code == 404
    assert ApiToken.objects.get(pk=theirs.pk).revoked_at is None


def test_revoking_a_revoked_token_keeps_when_it_was_first_revoked(users):
    token, _ = ApiToken.issue(users["member"], "laptop")
    assert token.revoke() is True
    first = ApiToken.objects.get(pk=token.pk).revoked_at
    stale = ApiToken.objects.get(pk=token.pk)
    assert stale.revoke() is False and stale.revoked_at == first
    # the API and the tokens page revoke through the same method, so they keep the first time too
    client = APIClient()
    client.force_authenticate(users["member"])
    assert client.delete(f"/api/v1/tokens/{token.pk}/").status_code == 204
    browser = Client()
    browser.force_login(users["member"])
    browser.post(f"/tokens/{token.pk}/revoke/")
    assert ApiToken.objects.get(pk=token.pk).revoked_at == first


def test_the_create_token_command_prints_a_working_key(users, project, capsys):
    call_command("create_token", "viewer", "--name", "laptop")
    key = capsys.readouterr().out.strip()
    assert APIClient(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").json()["count"] == 1


# --------------------------------------------------------------------------- CSRF

def test_session_writes_need_the_csrf_token_and_token_writes_do_not(users, project):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(users["owner"])
    refused = browser.patch(f"/api/v1/projects/{project.pk}/", {"description": "x"}, content_type="application/json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    form = browser.post(f"/projects/{project.pk}/datasets/new/", {"name": "d"})
    assert form.status_code == 403
    browser.get("/")  # a page sets the CSRF cookie, as a browser would receive it
    token = browser.cookies["csrftoken"].value
    ok = browser.patch(f"/api/v1/projects/{project.pk}/", {"description": "x"}, content_type="application/json",
                       HTTP_X_CSRFTOKEN=token)
    assert ok.status_code == 200
    _, key = ApiToken.issue(users["owner"], "script")
    script = APIClient(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Token {key}")
    assert script.patch(f"/api/v1/projects/{project.pk}/", {"description": "y"}, format="json").status_code == 200


# --------------------------------------------------------------------------- the web UI's role matrix

PERSONAS = ["owner", "member", "viewer", "outsider", None]


def test_every_web_page_by_role(project, users, registered, assets, settings, sent):
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"],
                         options={**FAST_AUDIT, "flag_max_alignment": 1.0, "flag_min_share": 0.0})
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    flag = audit.flags.first()
    project.max_concurrent_audits = 50
    project.save()
    p, a = project.pk, audit.pk
    reads = [f"/projects/{p}/", f"/audits/{a}/", f"/audits/{a}/status.json", f"/audits/{a}/report/",
             f"/audits/{a}/latents/", f"/audits/{a}/download/html", f"/audits/{a}/download/json",
             f"/audits/{a}/download/latents.csv", f"/audits/{a}/download/flags.csv"]
    forms = [f"/projects/{p}/models/new/", f"/projects/{p}/probes/new/", f"/projects/{p}/datasets/new/",
             f"/projects/{p}/audits/new/"]
    for persona in PERSONAS:
        client = Client()
        if persona:
            client.force_login(users[persona])
        for url in reads:
            status = client.get(url).status_code
            expected = {None: 302, "outsider": 404}.get(persona, 200)  # anonymous: to the sign-in page
            assert status == expected, (persona, url, status)
        for url in forms:
            status = client.get(url).status_code
            expected = {None: 302, "outsider": 404, "viewer": 403}.get(persona, 200)
            assert status == expected, (persona, url, status)
        writes = [
            (f"/projects/{p}/datasets/new/", {"name": f"d-{persona}", "archive": upload(assets["dataset"])}, 302),
            (f"/projects/{p}/audits/new/", {"clip_model": registered["model"].pk, "probe": registered["probe"].pk,
                                            "dataset": registered["dataset"].pk, "options": ""}, 302),
            (f"/audits/{a}/flags/{flag.pk}/review/", {"verdict": "benign"}, 302),
            (f"/audits/{a}/cancel/", {}, 302),  # a finished audit: refused with a message, still a redirect
        ]
        for url, data, allowed in writes:
            status = client.post(url, data).status_code
            expected = {None: 302, "outsider": 404, "viewer": 403}.get(persona, allowed)
            assert status == expected, (persona, url, status)
    assert Review.objects.filter(flag=flag).count() == 2  # owner and member
    assert project.datasets.count() == 3  # the registered one, owner's and member's
    assert project.audits.count() == 3


def test_stored_files_have_no_public_url(project, users, registered, settings):
    stored = registered["probe"].file.name
    client = Client()
    client.force_login(users["owner"])
    assert client.get(f"{settings.MEDIA_URL}{stored}").status_code == 404
    assert client.get(f"/media/{stored}").status_code == 404


# --------------------------------------------------------------------------- deployment

def test_production_settings_pass_the_deploy_check(tmp_path):
    env = {**os.environ, "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
           "DJANGO_ALLOWED_HOSTS": "audit.example.org", "CLIP_AUDIT_VAR_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_SECRET_KEY")}
    env.update(DJANGO_DEBUG="0", CLIP_AUDIT_VAR_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "DJANGO_SECRET_KEY" in result.stderr
