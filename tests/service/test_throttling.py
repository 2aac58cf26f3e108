"""Throttling of callers without valid credentials (issue 17, point 9): API calls refused for a missing or wrong key
count against the anonymous rate, and wrong passwords on the sign-in page lock that user name out from that
address for a cool-off (django-axes)."""
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from audit_service.accounts.models import ApiToken

pytestmark = pytest.mark.django_db

LOCKED = "too many failed sign-ins; try again in 15 minutes"


@pytest.fixture
def anonymous_rate(settings):
    settings.API_RATE_ANONYMOUS = "3/min"


def assert_throttled(response):
    assert response.status_code == 429
    assert "throttled" in response.json()["detail"] and int(response["Retry-After"]) > 0


# --------------------------------------------------------------------------- the API

def test_unauthenticated_calls_beyond_the_anonymous_rate_get_429(anonymous_rate, users, project):
    client = APIClient()
    refused = [client.get(f"/api/v1/projects/{project.pk}/") for _ in range(3)]
    assert [r.status_code for r in refused] == [401, 401, 401]
    assert refused[0].json()["detail"] == "Authentication credentials were not provided."
    assert_throttled(client.post("/api/v1/projects/", {"name": "x"}, format="json"))
    session = APIClient()  # a signed-in caller from the same address has a budget of its own
    session.force_authenticate(users["viewer"])
    assert [session.get(f"/api/v1/projects/{project.pk}/").status_code for _ in range(5)] == [200] * 5


def test_wrong_tokens_count_against_the_anonymous_rate_and_a_valid_token_keeps_its_own(anonymous_rate, users):
    guesses = [APIClient(HTTP_AUTHORIZATION=f"Token cat_guess{i}").get("/api/v1/projects/") for i in range(3)]
    assert [(r.status_code, r.json()["detail"]) for r in guesses] == [(401, "invalid token")] * 3
    assert_throttled(APIClient(HTTP_AUTHORIZATION="Token cat_guess3").get("/api/v1/projects/"))
    assert_throttled(APIClient(HTTP_AUTHORIZATION="Token").get("/api/v1/projects/"))  # a malformed header too
    _, key = ApiToken.issue(users["member"], "ci")
    assert APIClient(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").status_code == 200


def test_a_forged_x_forwarded_for_buys_no_fresh_budget(anonymous_rate):
    calls = [APIClient(HTTP_X_FORWARDED_FOR=f"10.0.0.{i}").get("/api/v1/projects/") for i in range(4)]
    assert [r.status_code for r in calls[:3]] == [401, 401, 401]
    assert_throttled(calls[3])


def test_behind_a_trusted_proxy_each_caller_has_its_own_budget(anonymous_rate, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    # the proxy appends the address it saw; whatever the caller wrote before it is not trusted
    first = APIClient(REMOTE_ADDR="10.9.9.9", HTTP_X_FORWARDED_FOR="1.1.1.1, 203.0.113.1")
    assert [first.get("/api/v1/projects/").status_code for _ in range(3)] == [401, 401, 401]
    assert_throttled(APIClient(REMOTE_ADDR="10.9.9.9", HTTP_X_FORWARDED_FOR="2.2.2.2, 203.0.113.1")
                     .get("/api/v1/projects/"))
    second = APIClient(REMOTE_ADDR="10.9.9.9", HTTP_X_FORWARDED_FOR="203.0.113.2")
    assert second.get("/api/v1/projects/").status_code == 401


# --------------------------------------------------------------------------- the sign-in page

def sign_in(client: Client, username: str, password: str):
    return client.post("/accounts/login/", {"username": username, "password": password, "next": "/"})


def test_a_hundred_wrong_passwords_lock_the_sign_in_and_the_right_one_is_refused_too(users):
    client = Client()
    answers = [sign_in(client, "viewer", f"guess-{i}") for i in range(100)]
    wrong = [r for r in answers if r.status_code == 200]
    locked = [r for r in answers if r.status_code == 429]
    assert len(wrong) == 9 and len(locked) == 91  # SIGNIN_FAILURE_LIMIT = 10 by default
    assert "Please enter a correct username and password" in wrong[0].content.decode()
    assert LOCKED in locked[-1].content.decode()
    right = sign_in(client, "viewer", "pw-viewer")
    assert right.status_code == 429 and LOCKED in right.content.decode()
    assert "_auth_user_id" not in client.session
    assert client.get("/").status_code == 302  # still sent to the sign-in page


def test_the_lockout_holds_for_one_user_name_from_one_address_until_the_cool_off_passes(users, settings):
    settings.AXES_FAILURE_LIMIT = 3
    client = Client()
    assert [sign_in(client, "viewer", "wrong").status_code for _ in range(3)] == [200, 200, 429]
    assert sign_in(Client(), "member", "pw-member").status_code == 302  # another user, same address
    elsewhere = Client(REMOTE_ADDR="192.0.2.7")
    assert sign_in(elsewhere, "viewer", "pw-viewer").status_code == 302  # a stranger cannot lock a user out
    assert sign_in(client, "viewer", "pw-viewer").status_code == 429
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    assert sign_in(client, "viewer", "pw-viewer").status_code == 302


def test_the_lockout_message_names_the_configured_cool_off(users, settings):
    settings.AXES_FAILURE_LIMIT, settings.AXES_COOLOFF_TIME = 1, 1 / 60
    page = sign_in(Client(), "viewer", "wrong")
    assert page.status_code == 429
    assert "too many failed sign-ins; try again in 1 minute<" in page.content.decode()
    assert 'name="username"' in page.content.decode()  # the form is still there for later


def test_the_admin_sign_in_is_locked_out_too(users, settings):
    settings.AXES_FAILURE_LIMIT = 2
    client = Client()
    for _ in range(2):
        client.post("/admin/login/", {"username": "owner", "password": "wrong"})
    refused = client.post("/admin/login/", {"username": "owner", "password": "pw-owner"})
    assert refused.status_code == 429 and LOCKED in refused.content.decode()


def test_the_sign_in_lockout_can_import_its_address_function_before_anything_else_of_the_api():
    """django-axes' system check imports AXES_CLIENT_IP_CALLABLE first thing; when the throttling module
    imported rest_framework.views, that was a circular import and `check --deploy` failed (axes.W005)."""
    code = ("import django; django.setup(); from django.conf import settings; "
            "from django.utils.module_loading import import_string; "
            "print(import_string(settings.AXES_CLIENT_IP_CALLABLE).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "DJANGO_SETTINGS_MODULE": "audit_service.settings"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "client_address"
