from django.urls import path

from audit_service.audits.jobs import kinds

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
    path("audits/<int:pk>/report/", views.audit_report, name="report"),
    path("audits/<int:pk>/latents/", views.audit_latents, name="latents"),
    path("audits/<int:pk>/diff/", views.audit_diff, name="diff"),
    path("audits/<int:pk>/download/<str:fmt>", views.audit_download, name="download"),
    path("audits/<int:pk>/flags/<int:flag_pk>/review/", views.flag_review, name="flag_review"),
    path("audits/<int:pk>/corrections/new/", views.correction_new, name="correction_new"),
    path("corrections/<int:pk>/", views.correction_detail, name="correction"),
    path("corrections/<int:pk>/training-data.csv", views.correction_training_data, name="correction_training_data"),
    path("probes/<int:pk>/download/", views.probe_download, name="probe_download"),
    path("audits/<int:pk>/explain/", views.explanation_new, name="explanation_new"),
    path("explanations/<int:pk>/", views.explanation_detail, name="explanation"),
    path("audits/<int:pk>/checklists/new/", views.checklist_new, name="checklist_new"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:token_pk>/revoke/", views.token_revoke, name="token_revoke"),
]

# every job kind (audits.jobs): its progress as JSON, cancelling it, and a page where it has none of its own
_PAGES = {p.name for p in urlpatterns}
for _kind in kinds():
    _args = {"kind": _kind.name}
    urlpatterns += [
        path(f"{_kind.plural}/<int:pk>/status.json", views.job_status, _args, name=f"{_kind.name}_status"),
        path(f"{_kind.plural}/<int:pk>/cancel/", views.job_cancel, _args, name=f"{_kind.name}_cancel"),
    ]
    if _kind.name not in _PAGES:
        urlpatterns.append(path(f"{_kind.plural}/<int:pk>/", views.job_detail, _args, name=_kind.name))
