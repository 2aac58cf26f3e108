"""Schema-based fuzzing: schemathesis generates requests for every operation of the served OpenAPI schema and
sends them, authenticated as a project member, to the app in-process. No request may end in a server error."""
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from audit_service.wsgi import application

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

schema = schemathesis.openapi.from_wsgi("/api/v1/schema/?format=json", application)


@pytest.fixture
def member_key(users, project, registered, settings):
    from audit_service.accounts.models import ApiToken

    settings.API_RATE_PER_TOKEN = "100000/min"
    return ApiToken.issue(users["member"], "fuzz")[1]


@pytest.fixture(autouse=True)
def keep_the_test_connection():
    """Calling the WSGI app directly would close the database connection after each request (Django's test
    client switches that off too): the test's transaction lives on that connection."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_the_schema_allows_makes_the_server_fail(case, member_key, sent):
    # sent: submitted audits stay queued
    response = case.call(headers={"Authorization": f"Token {member_key}"})
    case.validate_response(response, checks=[not_a_server_error])
