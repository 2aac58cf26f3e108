from django.contrib import admin

from .models import Membership, Project


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at", "max_concurrent_audits", "max_dataset_images", "max_dataset_bytes"]
    search_fields = ["name"]
    inlines = [MembershipInline]
