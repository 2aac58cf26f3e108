"""A token's project scope is a ceiling (issue 17, point 6): a token limited to projects mints no token, revokes no
other token, creates no project and changes nothing outside its projects; once its projects are all deleted it
reaches nothing, while a token created without projects still reaches every project of its user."""
import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from rest_framework.test import APIClient

from audit_service.accounts.models import ApiToken
from audit_service.projects.models import Membership, Project, Role

pytestmark = pytest.mark.django_db

PERSONAS = ["owner", "member", "viewer"]


def token_client(key: str) -> APIClient:
    return APIClient(HTTP_AUTHORIZATION=f"Token {key}")


@pytest.fixture
def radiology(project, users):
    """A second project every persona of the first also belongs to, with the same role."""
    other = Project.objects.create(name="Radiology")
    for name in PERSONAS:
        Membership.objects.create(project=other, user=users[name], role=Role(project.role_of(users[name])))
    return other


def scoped_key(user, project) -> str:
    return ApiToken.issue(user, "derm-ci", projects=[project])[1]


@pytest.mark.parametrize("persona", PERSONAS)
def test_a_scoped_token_cannot_mint_a_token(users, project, persona):
    key = scoped_key(users[persona], project)
    for body in ({"name": "wider"}, {"name": "same", "projects": [project.pk]}):
        response = token_client(key).post("/api/v1/tokens/", body, format="json")
        assert response.status_code == 403
        assert response.json()["detail"] == ("a token limited to projects cannot create tokens; sign in, or use a "
                                             "token without a project scope")
    assert ApiToken.objects.filter(user=users[persona]).count() == 1
    _, unscoped = ApiToken.issue(users[persona], "laptop")
    assert token_client(unscoped).post("/api/v1/tokens/", {"name": "ci"}, format="json").status_code == 201
    session = APIClient()
    session.force_authenticate(users[persona])
    assert session.post("/api/v1/tokens/", {"name": "ci-2"}, format="json").status_code == 201


@pytest.mark.parametrize("persona", PERSONAS)
def test_a_scoped_token_cannot_revoke_its_users_other_tokens_but_can_revoke_itself(users, project, persona):
    other, _ = ApiToken.issue(users[persona], "laptop")
    scoped, key = ApiToken.issue(users[persona], "derm-ci", projects=[project])
    client = token_client(key)
    refused = client.delete(f"/api/v1/tokens/{other.pk}/")
    assert refused.status_code == 403
    assert refused.json()["detail"].startswith("a token limited to projects cannot revoke other tokens")
    assert ApiToken.objects.get(pk=other.pk).active
    assert client.delete(f"/api/v1/tokens/{scoped.pk}/").status_code == 204  # a leaked key can put itself out
    assert not ApiToken.objects.get(pk=scoped.pk).active


def test_a_scoped_token_lists_only_itself(users, project):
    ApiToken.issue(users["member"], "laptop")
    scoped, key = ApiToken.issue(users["member"], "derm-ci", projects=[project])
    listed = token_client(key).get("/api/v1/tokens/").json()["results"]
    assert [(t["name"], t["projects"], t["scoped"]) for t in listed] == [("derm-ci", [project.pk], True)]


@pytest.mark.parametrize("persona", PERSONAS)
def test_a_scoped_token_cannot_create_a_project(users, project, persona):
    response = token_client(scoped_key(users[persona], project)).post("/api/v1/projects/", {"name": "Escape"},
                                                                      format="json")
    assert response.status_code == 403
    assert response.json()["detail"] == ("a token limited to projects cannot create projects; sign in, or use a "
                                         "token without a project scope")
    assert not Project.objects.filter(name="Escape").exists()
    _, unscoped = ApiToken.issue(users[persona], "laptop")
    created = token_client(unscoped).post("/api/v1/projects/", {"name": "Own"}, format="json")
    assert created.status_code == 201 and created.json()["role"] == "owner"


def test_a_token_whose_only_project_was_deleted_reaches_nothing(users, project, radiology, registered):
    _, key = ApiToken.issue(users["member"], "derm-ci", projects=[project])
    client = token_client(key)
    assert [p["name"] for p in client.get("/api/v1/projects/").json()["results"]] == ["Dermatology"]
    owner = APIClient()
    owner.force_authenticate(users["owner"])
    assert owner.delete(f"/api/v1/projects/{project.pk}/").status_code == 204
    for url in ("/api/v1/projects/", "/api/v1/models/", "/api/v1/datasets/", "/api/v1/audits/"):
        assert client.get(url).json()["count"] == 0, url
    assert client.get(f"/api/v1/projects/{radiology.pk}/").status_code == 404
    assert client.get(f"/api/v1/projects/{radiology.pk}/members/").status_code == 404
    refused = client.post("/api/v1/datasets/", {"project": radiology.pk, "name": "x"}, format="multipart")
    assert refused.status_code in (400, 404) and not radiology.datasets.exists()
    page = Client()
    page.force_login(users["member"])
    assert "none (its projects were deleted)" in page.get("/tokens/").content.decode()
    _, unscoped = ApiToken.issue(users["member"], "laptop")  # created without projects: all of its user's
    assert [p["name"] for p in token_client(unscoped).get("/api/v1/projects/").json()["results"]] == ["Radiology"]


@pytest.mark.parametrize("persona,allowed", [("owner", 201), ("member", 403), ("viewer", 403)])
def test_a_scoped_token_changes_members_only_of_its_own_projects_and_none_once_they_are_gone(
        users, project, radiology, persona, allowed):
    client = token_client(scoped_key(users[persona], project))
    teammate = radiology.memberships.get(user=users["viewer"])

    def change_radiology() -> list[int]:
        return [client.post(f"/api/v1/projects/{radiology.pk}/members/", {"username": "outsider", "role": "owner"},
                            format="json").status_code,
                client.patch(f"/api/v1/projects/{radiology.pk}/members/{teammate.pk}/", {"role": "owner"},
                             format="json").status_code,
                client.delete(f"/api/v1/projects/{radiology.pk}/members/{teammate.pk}/").status_code]

    assert change_radiology() == [404, 404, 404]
    inside = client.post(f"/api/v1/projects/{project.pk}/members/", {"username": "outsider", "role": "viewer"},
                         format="json")
    assert inside.status_code == allowed
    project.delete()
    assert change_radiology() == [404, 404, 404]
    assert not radiology.memberships.filter(user=users["outsider"]).exists()
    assert radiology.memberships.get(pk=teammate.pk).role == Role.VIEWER


def test_the_admin_scopes_a_token_given_projects_and_never_lifts_the_scope(users, project, admin_user):
    admin = Client()
    admin.force_login(admin_user)
    created = admin.post("/admin/accounts/apitoken/add/", {"user": users["member"].pk, "name": "derm-ci",
                                                           "projects": [project.pk]})
    assert created.status_code == 302
    token = ApiToken.objects.get(name="derm-ci")
    assert token.scoped and token.project_scope() == {project.pk}
    changed = admin.post(f"/admin/accounts/apitoken/{token.pk}/change/", {"name": "derm-ci", "projects": []})
    assert changed.status_code == 302
    token.refresh_from_db()
    assert token.scoped and token.project_scope() == set()


@pytest.mark.django_db(transaction=True)
def test_the_migration_marks_tokens_created_with_projects_as_scoped(users, project):
    executor = MigrationExecutor(connection)
    executor.migrate([("accounts", "0002_token_projects")])
    old = executor.loader.project_state([("accounts", "0002_token_projects")]).apps
    OldToken = old.get_model("accounts", "ApiToken")
    scoped = OldToken.objects.create(user_id=users["member"].pk, name="derm-ci", prefix="cat_a", key_digest="a")
    scoped.projects.set([project.pk])
    OldToken.objects.create(user_id=users["member"].pk, name="laptop", prefix="cat_b", key_digest="b")
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    assert dict(ApiToken.objects.values_list("name", "scoped")) == {"derm-ci": True, "laptop": False}
