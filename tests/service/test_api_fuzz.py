"""Schema-based fuzzing: schemathesis generates requests for every operation of the served OpenAPI schema and
sends them, authenticated as a project member, to the app in-process. No request may end in a server error.

An audit's config is fuzzed on its own too: every option of the served schema sent with a value of another JSON
type (and configs that are no JSON object), with valid project, model, probe and dataset so the config is what
is judged: each is a 400 naming the option."""
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from audit_service.wsgi import application

from .test_corrections import audited  # noqa: F401 (a fixture)

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


# --------------------------------------------------------------------------- wrong types for an audit's config

def config_options(config: dict, path: tuple = ()) -> list[tuple[tuple, set]]:
    """(path, JSON types it takes) of every option the served schema lets a user set, nested ones included."""
    found = []
    for name, option in config["properties"].items():
        if option.get("readOnly"):
            continue
        types = {option["type"], *(["null"] if option.get("nullable") else [])}
        found.append(((*path, name), types | ({"integer"} if "number" in types else set())))
        if option["type"] == "object" and "properties" in option:
            found.extend(config_options(option, (*path, name)))
    return found


JSON_VALUES = {
    "null": st.none(), "boolean": st.booleans(), "integer": st.integers(),
    "number": st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
    "string": st.text(max_size=12), "array": st.lists(st.integers(), max_size=3),
    "object": st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
}
CONFIG = schema.raw_schema["components"]["schemas"]["AuditRequest"]["properties"]["config"]
OPTIONS = config_options(CONFIG)


def nested(path: tuple, value) -> dict:
    return {path[0]: nested(path[1:], value) if len(path) > 1 else value}


def wrong_type(option: tuple[tuple, set]):
    path, types = option
    return st.sampled_from(sorted(set(JSON_VALUES) - types)).flatmap(JSON_VALUES.get).map(
        lambda value: (".".join(path), nested(path, value)))


# a config that is no JSON object, or one option (a nested one too) of a JSON type its schema does not allow
WRONG_CONFIGS = st.one_of(
    st.sampled_from(sorted(set(JSON_VALUES) - {"object"})).flatmap(JSON_VALUES.get).map(lambda value: ("", value)),
    st.sampled_from(OPTIONS).flatmap(wrong_type))
audit_submission = schema.include(path="/api/v1/audits/", method="POST")


def test_the_served_schema_types_every_option_of_an_audits_config():
    assert CONFIG["type"] == "object" and len(OPTIONS) > 30
    assert (("sae", "batch_size"), {"integer"}) in OPTIONS and (("causal",), {"boolean"}) in OPTIONS


@audit_submission.parametrize()
@audit_submission.given(wrong=WRONG_CONFIGS)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_a_config_of_a_wrong_type_is_a_400_naming_the_option(case, wrong, member_key, registered, sent):
    option, config = wrong
    case.media_type = "application/json"
    case.body = {"project": registered["model"].project_id, "clip_model": registered["model"].id,
                 "probe": registered["probe"].id, "dataset": registered["dataset"].id, "config": config}
    response = case.call(headers={"Authorization": f"Token {member_key}"})
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code == 400, (config, response.content)
    message = response.json()["config"][0]
    # an option is named as the API names it; null for the whole config is DRF's own "may not be null"
    assert message.startswith(f"{option}:" if option else ("config must be a JSON object", "This field")), message


# --------------------------------------------------------------------------- the doors the last round added

# registering an SAE, a dataset (by upload or by reference), and a correction or an explanation of a real audit
new_doors = schema.include(path_regex=r"^/api/v1/(saes/|datasets/|audits/\{id\}/(corrections|explain)/)$",
                           method="POST")


@new_doors.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_new_doors_answer_generated_requests_without_a_server_error(case, member_key, audited, settings,  # noqa: F811
                                                                        tmp_path, queue):  # noqa: F811
    # with the id of a succeeded audit, a folder open for datasets by reference and room for every job, the
    # generated bodies reach the checks behind the ids
    settings.DATASET_ROOTS = [str(tmp_path)]
    audited.project.max_concurrent_audits = 10_000
    audited.project.save()
    if case.path_parameters and "id" in case.path_parameters:
        case.path_parameters["id"] = audited.pk
    response = case.call(headers={"Authorization": f"Token {member_key}"})
    case.validate_response(response, checks=[not_a_server_error])
