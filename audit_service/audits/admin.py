from django.contrib import admin
from django.db.models import OuterRef, Subquery

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


class LatestVerdictFilter(admin.SimpleListFilter):
    """Filter flags by their latest review's verdict (older verdicts stay in the history, not in the filter)."""

    title = "latest verdict"
    parameter_name = "verdict"

    def lookups(self, request, model_admin):
        return [("unreviewed", "Not reviewed"), *Verdict.choices]

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        latest = Review.objects.filter(flag=OuterRef("pk")).order_by("-created_at", "-id").values("verdict")[:1]
        queryset = queryset.annotate(latest_verdict=Subquery(latest))
        if self.value() == "unreviewed":
            return queryset.filter(latest_verdict__isnull=True)
        return queryset.filter(latest_verdict=self.value())


@admin.register(Flag)
class FlagAdmin(admin.ModelAdmin):
    list_display = ["id", "audit", "head", "class_name", "latent", "label", "category", "share",
                    "confirmation_status", "latest_verdict"]
    list_filter = [LatestVerdictFilter, "head", "category", "confirmation_status", "confirmed", "class_name"]
    search_fields = ["label", "class_name"]
    readonly_fields = [f.name for f in Flag._meta.fields]
    inlines = [ReviewInline]
    actions = [_review_action(v) for v in Verdict]

    @admin.display(description="latest verdict")
    def latest_verdict(self, flag):
        review = flag.latest_review
        return review.get_verdict_display() if review else "–"

    def save_formset(self, request, form, formset, change):
        for review in formset.save(commit=False):
            review.reviewer = request.user
            review.save()


@admin.register(Latent)
class LatentAdmin(admin.ModelAdmin):
    list_display = ["audit", "latent", "label", "label_category", "label_alignment", "clarity", "frequency"]
    list_filter = ["label_category"]
    search_fields = ["label"]
    readonly_fields = [f.name for f in Latent._meta.fields]
