from django.contrib import admin

from .models import ClipModel, Dataset, Probe


@admin.register(ClipModel)
class ClipModelAdmin(admin.ModelAdmin):
    list_display = ["name", "project", "architecture", "pretrained_tag", "layer", "token", "embed_dim", "created_at"]
    list_filter = ["project", "token"]
    search_fields = ["name", "architecture"]
    readonly_fields = ["checkpoint_sha256", "embed_dim", "n_blocks", "width"]


@admin.register(Probe)
class ProbeAdmin(admin.ModelAdmin):
    list_display = ["name", "project", "clip_model", "normalization", "embed_dim", "created_at"]
    list_filter = ["project"]
    readonly_fields = ["sha256", "embed_dim", "class_names"]


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "project", "n_images", "source", "layout", "created_at"]
    list_filter = ["project", "source"]
    readonly_fields = ["sha256", "storage_prefix", "n_images", "class_names", "class_counts", "total_bytes",
                       "source", "location", "layout"]
