from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny
from rest_framework.routers import DefaultRouter

from audit_service.accounts.api import ApiTokenViewSet
from audit_service.audits.api import JOB_VIEWSETS, FlagViewSet, LatentViewSet, job_viewset
from audit_service.audits.jobs import kinds
from audit_service.projects.api import MembershipViewSet, ProjectViewSet
from audit_service.registry.api import ClipModelViewSet, DatasetViewSet, ProbeViewSet, SparseAutoencoderViewSet

router = DefaultRouter()
router.register("projects", ProjectViewSet, basename="project")
router.register("models", ClipModelViewSet, basename="clipmodel")
router.register("probes", ProbeViewSet, basename="probe")
router.register("datasets", DatasetViewSet, basename="dataset")
router.register("saes", SparseAutoencoderViewSet, basename="sae")
for kind in kinds():  # every job kind (audits.jobs): /api/v1/<kind>s/
    router.register(kind.plural, JOB_VIEWSETS.get(kind.name) or job_viewset(kind), basename=kind.name)
router.register("tokens", ApiTokenViewSet, basename="token")

nested = [
    path("projects/<int:project_pk>/members/", MembershipViewSet.as_view({"get": "list", "post": "create"}),
         name="membership-list"),
    path("projects/<int:project_pk>/members/<int:pk>/",
         MembershipViewSet.as_view({"patch": "partial_update", "put": "update", "delete": "destroy"}),
         name="membership-detail"),
    path("audits/<int:audit_pk>/flags/", FlagViewSet.as_view({"get": "list"}), name="flag-list"),
    path("audits/<int:audit_pk>/flags/<int:pk>/", FlagViewSet.as_view({"get": "retrieve"}), name="flag-detail"),
    path("audits/<int:audit_pk>/flags/<int:pk>/reviews/", FlagViewSet.as_view({"get": "reviews", "post": "reviews"}),
         name="flag-reviews"),
    path("audits/<int:audit_pk>/latents/", LatentViewSet.as_view({"get": "list"}), name="latent-list"),
    path("audits/<int:audit_pk>/latents/<int:latent>/", LatentViewSet.as_view({"get": "retrieve"}),
         name="latent-detail"),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/schema/", SpectacularAPIView.as_view(permission_classes=[AllowAny]), name="schema"),
    path("api/v1/docs/", SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[AllowAny]),
         name="api-docs"),
    path("api/v1/", include(router.urls)),
    path("api/v1/", include(nested)),
    path("api-auth/", include("rest_framework.urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("audit_service.web.urls")),
]
