from django.contrib import admin

from .models import Audit, Flag, Latent, Review, Verdict


@admin.register(Audit)
class AuditAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "status", "stage", "percent", "worker_host", "device", "created_at",
                    "finished_at"]
    list_filter = ["status", "project"]
    readonly_fields = [f.name for f in Audit._meta.fields]
    exclude = ["result"]


class ReviewInline(admin.TabularInline):
    model = Review
    extra = 1
    readonly_fields = ["reviewer", "created_at"]

    def has_change_permission(self, request, obj=None):
        return False  # the history of reviews is kept: add a new review instead of editing one


def _review_action(verdict):
    def act(modeladmin, request, queryset):
        Review.objects.bulk_create([Review(flag=f, reviewer=request.user, verdict=verdict,
                                           note="bulk review in the admin") for f in queryset])
        modeladmin.message_user(request, f"{queryset.count()} flags marked {verdict.label.lower()}")

    act.short_description = f"Mark selected flags: {verdict.label}"
    act.__name__ = f"mark_{verdict.value}"
    return act


@admin.register(Flag)
class FlagAdmin(admin.ModelAdmin):
    list_display = ["id", "audit", "head", "class_name", "latent_index", "label", "category", "share", "confirmed"]
    list_filter = ["head", "category", "confirmed", "class_name", "reviews__verdict"]
    search_fields = ["label", "class_name"]
    readonly_fields = [f.name for f in Flag._meta.fields]
    inlines = [ReviewInline]
    actions = [_review_action(v) for v in Verdict]

    def save_formset(self, request, form, formset, change):
        for review in formset.save(commit=False):
            review.reviewer = request.user
            review.save()


@admin.register(Latent)
class LatentAdmin(admin.ModelAdmin):
    list_display = ["audit", "index", "label", "label_category", "alignment", "clarity", "frequency"]
    list_filter = ["label_category"]
    search_fields = ["label"]
    readonly_fields = [f.name for f in Latent._meta.fields]
