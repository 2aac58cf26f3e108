"""The web UI: projects, registration forms, audit submission, live progress, the report, downloads, review.

Every view goes through the same project roles as the API: outsiders get
404 (they do not learn the object exists), viewers read, members register,
submit and review.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from axes.helpers import get_cool_off
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from audit_service.audits import report
from audit_service.audits.checklists import (UPLOAD, create_checklist, shipped_checklists, suspects_from_lines,
                                             upload_name)
from audit_service.audits.corrections import create_correction
from audit_service.audits.explanations import create_explanation
from audit_service.audits.jobs import job_kind, kind_of
from audit_service.audits.models import (Audit, Correction, Explanation, Flag, IllegalTransition, Review, Status,
                                         Verdict)
from audit_service.audits.services import create_audit
from audit_service.projects.models import Project, Role
from audit_service.registry import services
from audit_service.registry.models import DatasetPurpose, Probe
from audit_service.registry.services import RegistrationError

from .forms import AuditForm, DatasetForm, ModelForm, ProbeForm, ReviewForm, SAEForm


def _project(user, pk, at_least: str = Role.VIEWER) -> Project:
    project = Project.objects.for_user(user).filter(pk=pk).first()
    if project is None:
        raise Http404("no such project")
    if not project.has_role(user, at_least):
        raise PermissionDenied(f"your role in '{project.name}' does not allow this; it needs {at_least} or above")
    return project


def _audit(user, pk, at_least: str = Role.VIEWER) -> Audit:
    audit = get_object_or_404(Audit.objects.filter(project__in=Project.objects.for_user(user))
                              .select_related("project", "clip_model", "probe", "dataset"), pk=pk)
    _project(user, audit.project_id, at_least)
    return audit


def _apply_error(form, exc: RegistrationError) -> None:
    """Show a service's refusal next to the field it is about (or above the form)."""
    field = {"architecture": "architecture", "model_config": "model_config", "checkpoint": "checkpoint",
             "pretrained_tag": "pretrained_tag", "layer": "layer", "token": "token", "file": None,
             "archive": "archive", "location": "location", "layout": "layout", "source": "source", "clip_model": "clip_model", "probe": "probe", "dataset": "dataset",
             "sae_dataset": "sae_dataset", "purpose": "purpose", "config": "options"}.get(exc.field or "", None)
    if exc.field == "file":
        field = "file" if "file" in form.fields else ("checkpoint" if "checkpoint" in form.fields else None)
    elif exc.field in form.fields:  # the form has the service's field under its own name (e.g. an SAE's config)
        field = exc.field
    form.add_error(field if field in form.fields else None, exc.message)


# --------------------------------------------------------------------------- projects

@login_required
def home(request):
    projects = Project.objects.for_user(request.user)
    rows = [{"project": p, "role": p.role_of(request.user), "n_audits": p.audits.count(),
             "last": p.audits.first()} for p in projects]
    return render(request, "web/home.html", {"rows": rows})


@login_required
def project_detail(request, pk):
    project = _project(request.user, pk)
    audits = Paginator(project.audits.select_related("clip_model", "probe", "dataset"), 20)
    return render(request, "web/project.html", {
        "project": project, "role": project.role_of(request.user),
        "can_write": project.has_role(request.user, Role.MEMBER),
        "models": project.clip_models.all(),
        "probes": project.probes.select_related("clip_model", "parent", "made_by").prefetch_related("made_by__flags"),
        "datasets": project.datasets.all(), "audits": audits.get_page(request.GET.get("page")),
        "saes": project.saes.select_related("clip_model"),
    })


def _register_view(request, pk, form_class, title: str, register, template="web/form.html"):
    project = _project(request.user, pk, Role.MEMBER)
    kwargs = {"project": project} if form_class in (ProbeForm, AuditForm, SAEForm) else {}
    form = form_class(request.POST or None, request.FILES or None, **kwargs)
    if request.method == "POST" and form.is_valid():
        try:
            obj = register(project, form)
        except RegistrationError as exc:
            _apply_error(form, exc)
        else:
            return obj
    return render(request, template, {"project": project, "form": form, "title": title})


@login_required
def model_new(request, pk):
    def register(project, form):
        d = form.cleaned_data
        obj = services.register_model(project=project, user=request.user, name=d["name"],
                                      architecture=d["architecture"], pretrained_tag=d["pretrained_tag"],
                                      checkpoint=d["checkpoint"], model_config=d["model_config"],
                                      layer=d["layer"], token=d["token"])
        messages.success(request, f"Model '{obj.name}' registered ({obj.source}).")
        return redirect("web:project", pk=project.pk)

    return _register_view(request, pk, ModelForm, "Register a CLIP model", register)


@login_required
def probe_new(request, pk):
    def register(project, form):
        d = form.cleaned_data
        obj = services.register_probe(project=project, user=request.user, name=d["name"], clip_model=d["clip_model"],
                                      file=d["file"], class_names=d["class_names"],
                                      normalization=d["normalization"] or None)
        messages.success(request, f"Probe '{obj.name}' registered: classes {', '.join(obj.class_names)}.")
        return redirect("web:project", pk=project.pk)

    return _register_view(request, pk, ProbeForm, "Register a linear probe", register)


@login_required
def dataset_new(request, pk):
    def register(project, form):
        d = form.cleaned_data
        obj = services.add_dataset(project=project, user=request.user, name=d["name"], source=d["source"],
                                   archive=d["archive"], location=d["location"], layout=d["layout"],
                                   purpose=d["purpose"])
        classes = f"classes {', '.join(obj.class_names)}" if obj.class_names else "unlabelled"
        columns = f"; metadata columns {', '.join(obj.metadata_columns)}" if obj.metadata_columns else ""
        how = "uploaded" if not obj.by_reference else f"registered, read from its {obj.where}"
        messages.success(request, f"Dataset '{obj.name}' {how}: {obj.n_images} images, {classes}{columns}.")
        return redirect("web:project", pk=project.pk)

    return _register_view(request, pk, DatasetForm, "Add a dataset", register)


@login_required
def sae_new(request, pk):
    def register(project, form):
        d = form.cleaned_data
        obj = services.register_sae(project=project, user=request.user, name=d["name"], clip_model=d["clip_model"],
                                    format=d["format"], config=d["config"], weights=d["weights"])
        messages.success(request, f"SAE '{obj.name}' registered: {obj.n_latents} latents, k = {obj.k}, for "
                                  f"model '{obj.clip_model.name}'.")
        return redirect("web:project", pk=project.pk)

    return _register_view(request, pk, SAEForm, "Register an SAE trained elsewhere", register)


@login_required
def audit_new(request, pk):
    def register(project, form):
        d = form.cleaned_data
        audit = create_audit(project=project, user=request.user, clip_model=d["clip_model"], probe=d["probe"],
                             dataset=d["dataset"], sae_dataset=d["sae_dataset"], sae=d["sae"],
                             options=form.audit_options())
        return redirect("web:audit", pk=audit.pk)

    return _register_view(request, pk, AuditForm, "Submit an audit", register)


# --------------------------------------------------------------------------- audits

def _progress(job) -> dict:
    """What a job's progress bar shows (``Job.progress_view``), with the page of its result once it succeeded."""
    kind = kind_of(job)
    done = {"audit": "web:report"}.get(kind.name, f"web:{kind.name}")
    return {**job.progress_view(),
            "report_url": reverse(done, args=[job.pk]) if job.status == Status.SUCCEEDED else None}


def _job(user, kind_name: str, pk: int, at_least: str = Role.VIEWER):
    kind = job_kind(kind_name)
    job = get_object_or_404(kind.for_user(user), pk=pk)
    _project(user, job.project_id, at_least)
    return job


@login_required
def job_detail(request, pk, kind: str):
    """The page of a job of a kind that has no page of its own: its progress, cancel and result as JSON."""
    job = _job(request.user, kind, pk)
    return render(request, "web/job.html", {
        "job": job, "project": job.project, "noun": job.noun, "progress": _progress(job),
        "status_url": reverse(f"web:{kind}_status", args=[job.pk]),
        "cancel_url": reverse(f"web:{kind}_cancel", args=[job.pk]),
        "result_json": json.dumps(job.result, indent=2, sort_keys=True) if job.result else "",
        "can_write": job.project.has_role(request.user, Role.MEMBER)})


@login_required
def job_status(request, pk, kind: str):
    """A job's progress as JSON (``/<kind>s/<id>/status.json``), for any kind: its page polls it."""
    return JsonResponse(_progress(_job(request.user, kind, pk)))


@login_required
@require_POST
def job_cancel(request, pk, kind: str):
    """Cancel a job of any kind (a queued one at once, a running one is asked to stop) and go back to its page."""
    job = _job(request.user, kind, pk, Role.MEMBER)
    try:
        job.cancel()
        messages.info(request, "Cancellation requested." if job.status == Status.RUNNING
                      else f"{job.noun.capitalize()} cancelled.")
    except IllegalTransition as exc:
        messages.error(request, str(exc))
    return redirect(f"web:{kind}", pk=job.pk)


@login_required
def audit_detail(request, pk):
    audit = _audit(request.user, pk)
    return render(request, "web/audit.html", {
        "audit": audit, "project": audit.project, "progress": _progress(audit),
        "config_json": json.dumps(audit.config, indent=2, sort_keys=True),
        "can_write": audit.project.has_role(request.user, Role.MEMBER)})


def _succeeded(user, pk) -> Audit:
    audit = _audit(user, pk)
    if audit.status != Status.SUCCEEDED:
        raise Http404(f"audit {audit.pk} is {audit.status}; its report exists once it has succeeded")
    return audit


@login_required
def audit_report(request, pk):
    audit = _succeeded(request.user, pk)
    context = report.report_context(audit, filters=report.flag_filters(request.GET))
    can_review = audit.project.has_role(request.user, Role.MEMBER)
    context.update(standalone=False, project=audit.project, can_review=can_review, review_form=ReviewForm(),
                   other_audits=audit.project.audits.filter(status=Status.SUCCEEDED).exclude(pk=audit.pk)[:50])
    if can_review:
        context.update(correctable=_correctable(audit), training_datasets=audit.project.datasets.filter(
            purpose=DatasetPurpose.AUDIT),
            dataset_items=[key for key, _ in audit.dataset.labels()][:EXPLAIN_ITEMS_LISTED],
            shipped_checklists=shipped_checklists())
    context["explanations"] = audit.explanations.all()[:20]
    context["checklists"] = audit.checklists.all()[:20]
    return render(request, "web/report.html", context)


EXPLAIN_ITEMS_LISTED = 500  # dataset images offered in the explain form's list (any other can be typed)


def _correctable(audit: Audit) -> list[Flag]:
    """The audit's probe flags, those reviewed as confirmed shortcuts preselected (the correction's default)."""
    flags = list(audit.flags.filter(head="probe").prefetch_related("reviews").order_by("class_name", "rank"))
    for f in flags:
        latest = f.latest_review
        f.verdict = latest.get_verdict_display() if latest else ""
        f.preselected = bool(latest and latest.verdict == Verdict.CONFIRMED_SHORTCUT)
    return flags


# --------------------------------------------------------------------------- corrections

def _correction(user, pk, at_least: str = Role.VIEWER) -> Correction:
    correction = get_object_or_404(Correction.objects.filter(project__in=Project.objects.for_user(user))
                                   .select_related("project", "audit", "new_probe", "reaudit"), pk=pk)
    _project(user, correction.project_id, at_least)
    return correction


@login_required
@require_POST
def correction_new(request, pk):
    """The report's "Make a corrected probe" form."""
    audit = _audit(request.user, pk, Role.MEMBER)
    back = reverse("web:report", args=[audit.pk]) + "#corrections"
    try:
        flags = [int(v) for v in request.POST.getlist("flags")]
        drop = float(request.POST.get("max_clean_drop") or 0.02)
        rounds = int(request.POST.get("rounds") or 3)
        training_id = request.POST.get("training_dataset") or None
    except ValueError:
        messages.error(request, "The correction was not made: the flags, the accuracy drop and the rounds must be "
                                "numbers.")
        return redirect(back)
    if not flags:
        messages.error(request, "The correction was not made: tick at least one flag to correct.")
        return redirect(back)
    training = None
    if training_id is not None:
        training = audit.project.datasets.filter(pk=training_id).first()
        if training is None:
            messages.error(request, "The correction was not made: no such training dataset in this project.")
            return redirect(back)
    options = {"anchor": request.POST.get("anchor", "mean"), "max_clean_drop": drop, "rounds": rounds}
    if request.POST.get("column"):
        options["column"] = request.POST["column"]
    try:
        correction = create_correction(audit=audit, user=request.user, flag_ids=flags,
                                       method=request.POST.get("method", ""), training_dataset=training,
                                       options=options)
    except RegistrationError as exc:
        messages.error(request, f"The correction was not made: {exc.message}")
        return redirect(back)
    return redirect("web:correction", pk=correction.pk)


@login_required
def correction_detail(request, pk):
    correction = _correction(request.user, pk)
    return render(request, "web/correction.html", {
        "correction": correction, "audit": correction.audit, "project": correction.project,
        "cv": report.correction_view(correction), "progress": _progress(correction),
        "can_write": correction.project.has_role(request.user, Role.MEMBER), "standalone": False})


@login_required
def correction_training_data(request, pk):
    """The training images on which the corrected concept is active, as CSV (viewers too)."""
    return report.training_response(_correction(request.user, pk))


# --------------------------------------------------------------------------- confounder checklists

@login_required
@require_POST
def checklist_new(request, pk):
    """The report's "Ask about suspects" form: a shipped checklist, or text suspects one per line ("name: text"),
    plus, optionally, one suspect by example images uploaded with it (its name, images with it, images without)."""
    audit = _audit(request.user, pk, Role.MEMBER)
    back = reverse("web:report", args=[audit.pk]) + "#checklist"
    suspects = suspects_from_lines(request.POST.get("suspects", ""))
    try:
        examples, images = _suspect_by_examples(request)
        if examples:
            suspects.append(examples)
        checklist = create_checklist(audit=audit, user=request.user, suspects=suspects or None,
                                     checklist=request.POST.get("checklist", "").strip(), images=images)
    except RegistrationError as exc:
        messages.error(request, f"The checklist was not asked: {exc.message}")
        return redirect(back)
    messages.success(request, f"Checklist #{checklist.pk} asked about {len(checklist.suspects)} suspects; its "
                              "answers show here once a worker has run it.")
    return redirect(back)


def _suspect_by_examples(request) -> tuple[dict | None, list]:
    """The form's "By example images" part: ``examples_name`` and the files ``with_images`` (showing it) and
    ``without_images`` (not showing it) as one suspect naming each file ``upload:NAME``, and the files; (None, [])
    when that part is left empty."""
    name = request.POST.get("examples_name", "").strip()
    with_files, without_files = request.FILES.getlist("with_images"), request.FILES.getlist("without_images")
    if not (name or with_files or without_files):
        return None, []
    if not name:
        raise RegistrationError("name the suspect your example images show (By example images: its name)",
                                field="suspects")
    if not with_files or not without_files:
        raise RegistrationError(f"suspect {name!r}: choose image files both with it and without it (at least 3 "
                                "of each; 10 and 10 tell them apart reliably)", field="images")
    return ({"name": name, "with": [UPLOAD + upload_name(f) for f in with_files],
             "without": [UPLOAD + upload_name(f) for f in without_files]}, [*with_files, *without_files])


# --------------------------------------------------------------------------- explaining one image

@login_required
@require_POST
def explanation_new(request, pk):
    """The report's "Explain one image" form: an upload, or an image of the audited dataset."""
    audit = _audit(request.user, pk, Role.MEMBER)
    try:
        explanation = create_explanation(audit=audit, user=request.user, image=request.FILES.get("image"),
                                         item=request.POST.get("item", "").strip())
    except RegistrationError as exc:
        messages.error(request, f"The image was not explained: {exc.message}")
        return redirect(reverse("web:report", args=[audit.pk]) + "#explain")
    return redirect("web:explanation", pk=explanation.pk)


def _explanation(user, pk) -> Explanation:
    explanation = get_object_or_404(Explanation.objects.filter(project__in=Project.objects.for_user(user))
                                    .select_related("project", "audit__dataset", "audit__probe",
                                                    "audit__clip_model"), pk=pk)
    _project(user, explanation.project_id)
    return explanation


@login_required
def explanation_detail(request, pk):
    explanation = _explanation(request.user, pk)
    return render(request, "web/explanation.html", {
        "explanation": explanation, "audit": explanation.audit, "project": explanation.project,
        "progress": _progress(explanation), "ev": report.explanation_view(explanation),
        "can_write": explanation.project.has_role(request.user, Role.MEMBER)})


@login_required
def probe_download(request, pk):
    probe = get_object_or_404(Probe.objects.filter(project__in=Project.objects.for_user(request.user)), pk=pk)
    return FileResponse(probe.file.open("rb"), as_attachment=True, filename=Path(probe.file.name).name)


@login_required
def audit_diff(request, pk):
    from audit_service.audits.diff import audit_diff as compute

    audit = _succeeded(request.user, pk)
    try:
        baseline = _succeeded(request.user, int(request.GET.get("baseline", "")))
    except ValueError:
        raise Http404("choose a baseline audit to compare with") from None
    if baseline.project_id != audit.project_id:
        raise Http404("the baseline belongs to another project")
    return render(request, "web/diff.html", {"audit": audit, "baseline": baseline, "project": audit.project,
                                             "diff": compute(baseline, audit)})


@login_required
def audit_latents(request, pk):
    audit = _succeeded(request.user, pk)
    rows = audit.latents.all()
    query = request.GET.get("q", "").strip()
    if query:
        rows = rows.filter(label__icontains=query)
    order = request.GET.get("order", "latent")
    if order in report.LATENT_ORDERS:
        rows = rows.order_by(order)
    page = Paginator(rows, 50).get_page(request.GET.get("page"))
    report.latent_rows(audit, page)
    return render(request, "web/latents.html", {"audit": audit, "project": audit.project, "page": page,
                                                "q": query, "order": order, "orders": report.LATENT_ORDERS,
                                                "columns": report.LATENT_PAGE_COLUMNS})


@login_required
def audit_download(request, pk, fmt):
    return report.download_response(_succeeded(request.user, pk), fmt)


@login_required
@require_POST
def flag_review(request, pk, flag_pk):
    audit = _audit(request.user, pk, Role.MEMBER)
    flag = get_object_or_404(Flag, pk=flag_pk, audit=audit)
    form = ReviewForm(request.POST)
    if form.is_valid():
        Review.objects.create(flag=flag, reviewer=request.user, verdict=form.cleaned_data["verdict"],
                              note=form.cleaned_data["note"])
        messages.success(request, f"Review saved for latent {flag.latent} ({flag.class_name}).")
    else:
        messages.error(request, "The review was not saved: " + "; ".join(
            f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
    return redirect(reverse("web:report", args=[audit.pk]) + f"#flag-{flag.pk}")


# --------------------------------------------------------------------------- signing in

def signin_locked_out(request, original_response=None, credentials=None):
    """django-axes' answer to a sign-in from a locked-out user name and address (AXES_LOCKOUT_CALLABLE): the sign-in
    page again, saying why and for how long. Every attempt while locked out restarts the cool-off, so it is the
    whole of it."""
    minutes = max(1, math.ceil(get_cool_off(request).total_seconds() / 60))
    form = AuthenticationForm(request, initial={"username": (credentials or {}).get("username") or ""})
    return render(request, "registration/login.html", {
        "form": form, "next": request.POST.get("next", ""),
        "lockout": f"too many failed sign-ins; try again in {minutes} minute{'s' if minutes != 1 else ''}",
    }, status=429)


# --------------------------------------------------------------------------- API tokens

@login_required
def tokens(request):
    """The user's API tokens: create one (its key is shown on this page once), revoke one."""
    from audit_service.accounts.models import ApiToken

    from .forms import TokenForm

    form = TokenForm(request.POST or None, user=request.user)
    new_key = None
    if request.method == "POST" and form.is_valid():
        token, new_key = ApiToken.issue(request.user, form.cleaned_data["name"],
                                        projects=form.cleaned_data["projects"])
        form = TokenForm(user=request.user)
    rows = ApiToken.objects.filter(user=request.user).prefetch_related("projects")
    return render(request, "web/tokens.html", {"form": form, "tokens": rows, "new_key": new_key})


@login_required
@require_POST
def token_revoke(request, token_pk):
    from audit_service.accounts.models import ApiToken

    token = get_object_or_404(ApiToken, pk=token_pk, user=request.user)
    if token.revoke():
        messages.success(request, f"Token '{token.name}' ({token.prefix}...) revoked.")
    return redirect("web:tokens")
