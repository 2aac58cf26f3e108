from django.contrib import admin

from .models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["name", "user__username", "prefix"]
    readonly_fields = ["user", "prefix", "key_digest", "created_at", "last_used_at"]

    def has_add_permission(self, request):
        return False  # keys are issued by `manage.py create_token` or POST /api/v1/tokens/, shown once
