from django.urls import path

from . import views

app_name = "web"

urlpatterns = [
    path("", views.home, name="home"),
    path("projects/<int:pk>/", views.project_detail, name="project"),
    path("projects/<int:pk>/models/new/", views.model_new, name="model_new"),
    path("projects/<int:pk>/probes/new/", views.probe_new, name="probe_new"),
    path("projects/<int:pk>/datasets/new/", views.dataset_new, name="dataset_new"),
    path("projects/<int:pk>/saes/new/", views.sae_new, name="sae_new"),
    path("projects/<int:pk>/audits/new/", views.audit_new, name="audit_new"),
    path("audits/<int:pk>/", views.audit_detail, name="audit"),
    path("audits/<int:pk>/status.json", views.audit_status, name="audit_status"),
    path("audits/<int:pk>/cancel/", views.audit_cancel, name="audit_cancel"),
    path("audits/<int:pk>/report/", views.audit_report, name="report"),
    path("audits/<int:pk>/latents/", views.audit_latents, name="latents"),
    path("audits/<int:pk>/diff/", views.audit_diff, name="diff"),
    path("audits/<int:pk>/download/<str:fmt>", views.audit_download, name="download"),
    path("audits/<int:pk>/flags/<int:flag_pk>/review/", views.flag_review, name="flag_review"),
    path("audits/<int:pk>/corrections/new/", views.correction_new, name="correction_new"),
    path("corrections/<int:pk>/", views.correction_detail, name="correction"),
    path("corrections/<int:pk>/status.json", views.correction_status, name="correction_status"),
    path("corrections/<int:pk>/cancel/", views.correction_cancel, name="correction_cancel"),
    path("probes/<int:pk>/download/", views.probe_download, name="probe_download"),
    path("audits/<int:pk>/explain/", views.explanation_new, name="explanation_new"),
    path("explanations/<int:pk>/", views.explanation_detail, name="explanation"),
    path("explanations/<int:pk>/status.json", views.explanation_status, name="explanation_status"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:token_pk>/revoke/", views.token_revoke, name="token_revoke"),
]
