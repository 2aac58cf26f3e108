"""API tokens for scripts and CI: only a SHA-256 digest of each key is stored; the key is shown once."""
from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

KEY_PREFIX = "cat_"  # "CLIP audit token": easy to spot in a leaked log or a secret scanner


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16)  # the key's first characters: which token this is, not the key
    key_digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # the projects this token may reach (of those its user belongs to), when ``scoped``
    projects = models.ManyToManyField("projects.Project", blank=True, related_name="+")
    # recorded apart from ``projects`` because deleting a project empties the list: a token scoped to it must then
    # reach nothing, not every project of its user
    scoped = models.BooleanField(default=False, help_text="limited to its projects (none once they are all deleted); "
                                                          "unticked: all of its user's projects")

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...) of {self.user}"

    def set_new_key(self) -> str:
        """Give this (unsaved) token a fresh key: store its prefix and digest, return the key itself."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        self.prefix, self.key_digest = key[:12], digest(key)
        return key

    @classmethod
    def issue(cls, user, name: str, expires_at=None, projects=()) -> tuple["ApiToken", str]:
        """A new token and its key; the key exists only in the return value."""
        token = cls(user=user, name=name, expires_at=expires_at, scoped=bool(projects))
        key = token.set_new_key()
        with transaction.atomic():  # never a scoped token without its projects
            token.save()
            if projects:
                token.projects.set(projects)
        return token, key

    def project_scope(self) -> set[int] | None:
        """The ids of the projects this token may reach; None: every project of its user."""
        return set(self.projects.values_list("pk", flat=True)) if self.scoped else None

    def revoke(self) -> bool:
        """Stop this token working from now on. True if this call revoked it; False if it already was (a second
        revocation keeps the first time, so the record says when the key stopped working)."""
        now = timezone.now()
        if not ApiToken.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=now):
            self.refresh_from_db(fields=["revoked_at"])
            return False
        self.revoked_at = now
        return True

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > timezone.now())
