from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions

from .models import ApiToken, digest


class HashedTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Token <key>`` (or ``Bearer <key>``), checked against stored digests."""

    keywords = ("token", "bearer")

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].decode(errors="replace").lower() not in self.keywords:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("the Authorization header must be 'Token <key>'")
        try:
            key = header[1].decode()
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("the token holds characters a key never has") from None
        token = ApiToken.objects.select_related("user").filter(key_digest=digest(key)).first()
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("invalid token")
        if not token.active:
            raise exceptions.AuthenticationFailed(f"token '{token.name}' was revoked or has expired; "
                                                  "create a new one")
        token.user.token_project_ids = token.project_scope()  # read by Project.objects.for_user for this request
        now = timezone.now()
        if token.last_used_at is None or now - token.last_used_at > timedelta(minutes=1):
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request):
        return "Token"


def refuse_scoped_token(request, action: str) -> None:
    """A project-scoped token's scope is a ceiling: what no project names (creating a project, minting or revoking
    tokens) is beyond it, or the token could hand itself a wider one."""
    if isinstance(request.auth, ApiToken) and request.auth.scoped:
        raise exceptions.PermissionDenied(f"a token limited to projects cannot {action}; sign in, or use a token "
                                          "without a project scope")
