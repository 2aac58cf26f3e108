from django import forms
from django.contrib import admin, messages

from .models import ApiToken


class NewTokenForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["user", "name", "projects", "expires_at"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Admins create tokens for users (the key is shown once, in the confirmation message) and revoke them."""

    list_display = ["name", "user", "prefix", "scoped", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_filter = ["revoked_at", "scoped"]
    search_fields = ["name", "user__username", "prefix"]
    # a scope is set by picking projects and is never lifted (emptying it leaves a token that reaches nothing):
    # a wider token is a new token
    readonly_fields = ["prefix", "key_digest", "scoped", "created_at", "last_used_at"]
    filter_horizontal = ["projects"]
    actions = ["revoke"]

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = NewTokenForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields + (["user"] if obj else [])

    def get_fields(self, request, obj=None):
        return NewTokenForm.Meta.fields if obj is None else super().get_fields(request, obj)

    def save_model(self, request, obj, form, change):
        if not change:
            key = obj.set_new_key()
            messages.warning(request, f"The key of token '{obj.name}' for {obj.user}: {key} — copy it now, it is "
                                      "not stored and cannot be shown again.")
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        token = form.instance
        if not token.scoped and token.projects.exists():
            token.scoped = True
            token.save(update_fields=["scoped"])

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset):
        n = sum(token.revoke() for token in queryset)
        self.message_user(request, f"{n} tokens revoked")
