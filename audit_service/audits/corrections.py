"""Corrections: submitting one, and finishing it once its re-audit finished (the diff and the verdict)."""
from __future__ import annotations

from django.db import transaction
from django.dispatch import receiver

from audit_service.registry.models import DatasetPurpose
from audit_service.registry.services import RegistrationError, add_probe_version
from workers.engine.config import CORRECTION_METHODS as METHODS
from workers.engine.config import CorrectionOptions
from workers.engine.columns import binary_column
from workers.engine.rounds import next_round
from workers.engine.errors import EngineError

from .diff import audit_diff
from .jobs import JobKind, check_room, register
from .services import create_reaudit
from .models import FINISHED, REAUDIT_STAGE, Audit, Correction, Flag, Status, Verdict, audit_finished

SAE_ARTIFACTS = ("sae/sae.safetensors", "sae/sae.json", "sae/metrics.json")
TRAINED = ("refit", "reweight")  # the methods that fit a new probe on the probe's training split


def default_flags(audit: Audit) -> list[Flag]:
    """The audit's probe flags whose latest review calls them a confirmed shortcut."""
    flags = audit.flags.filter(head="probe").prefetch_related("reviews")
    return [f for f in flags if f.latest_review and f.latest_review.verdict == Verdict.CONFIRMED_SHORTCUT]


def correction_options(options) -> dict:
    """The correction's options, typed and in range (``CorrectionOptions``), as stored."""
    try:
        return CorrectionOptions.from_dict(options).to_dict()
    except EngineError as exc:
        raise RegistrationError(exc.message, field="options") from exc


def create_correction(*, audit: Audit, user, flag_ids: list | None = None, method: str = "",
                      options: dict | None = None, training_dataset=None) -> Correction:
    """Check the request, create the correction and enqueue it once the row is committed.

    ``flag_ids``: probe flags of ``audit`` (None: the ones reviewed as confirmed shortcuts). ``method``:
    "project", "refit", "reweight" or "" (refit when a training dataset is given, else project).
    ``training_dataset``: a labelled dataset of the project, the probe's training split (labels.csv format), for
    "refit" and "reweight".
    """
    require_sae(audit, "only a succeeded audit can be corrected", "correct the new one")
    flags = _chosen_flags(audit, flag_ids)
    if method not in ("", *METHODS):
        raise RegistrationError(f"method must be one of {', '.join(METHODS)} (or empty: refit when a training "
                                f"dataset is given, else project), got {method!r}", field="method")
    options = correction_options(options)
    _check_column(audit, options)
    _check_training(audit, method, training_dataset, options)
    with transaction.atomic():
        check_room(audit.project)
        correction = Correction.objects.create(project=audit.project, audit=audit, method=method, options=options,
                                               training_dataset=training_dataset, created_by=user)
        correction.flags.set(flags)
        CORRECTION.enqueue_on_commit(correction.pk)
    return correction


def require_sae(audit: Audit, unfinished: str, then: str) -> None:
    """Refuse a job on an audit that has not succeeded (``unfinished`` says why it must have) or kept no SAE
    (``then``: what to do with the audit run again)."""
    if audit.status != Status.SUCCEEDED:
        raise RegistrationError(f"audit {audit.pk} is {audit.status}; {unfinished}", field="audit")
    artifacts = (audit.result or {}).get("artifacts") or {}
    if not all(rel in artifacts for rel in SAE_ARTIFACTS):
        raise RegistrationError(f"audit {audit.pk} kept no SAE (it was stored by an older version); run the audit "
                                f"again, then {then}", field="audit")


def _chosen_flags(audit: Audit, flag_ids) -> list[Flag]:
    if flag_ids is None:
        flags = default_flags(audit)
        if not flags:
            raise RegistrationError("no flag chosen and none of this audit's probe flags is reviewed as a confirmed "
                                    "shortcut; review the flags, or name them (flags: [flag ids])", field="flags")
        return flags
    if not isinstance(flag_ids, list) or not flag_ids or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in flag_ids):
        raise RegistrationError("flags must be a non-empty list of flag ids (integers) of this audit", field="flags")
    found = {f.pk: f for f in audit.flags.filter(pk__in=flag_ids)}
    missing = [i for i in flag_ids if i not in found]
    if missing:
        raise RegistrationError(f"flag(s) {', '.join(map(str, missing))} are not flags of audit {audit.pk}",
                                field="flags")
    zero_shot = [i for i in flag_ids if found[i].head != "probe"]
    if zero_shot:
        raise RegistrationError(f"flag(s) {', '.join(map(str, zero_shot))} are zero-shot flags; a correction "
                                "changes the probe, so choose probe flags", field="flags")
    return [found[i] for i in dict.fromkeys(flag_ids)]


def _check_column(audit: Audit, options: dict) -> None:
    """The ``column`` option names a 0/1 column of the audited dataset's labels.csv that marks some of its images
    and not all; checked here, so a wrong one is refused at once rather than failing the job."""
    column = options.get("column")
    if column is None:
        return
    dataset = audit.dataset
    _, metadata = dataset.table()
    try:
        marked = binary_column(metadata, column, "to mark the concept's images")
    except EngineError as exc:
        raise RegistrationError(f"dataset '{dataset.name}': {exc.message}", field="options") from exc
    if marked.all() or not marked.any():
        raise RegistrationError(f"column {column!r} marks {'every' if marked.any() else 'no'} image of dataset "
                                f"'{dataset.name}', so it tells no images with the concept from those without; "
                                "give a column that marks some of them, or none", field="options")


def _check_training(audit: Audit, method: str, dataset, options: dict) -> None:
    if dataset is None:
        if method in TRAINED:
            raise RegistrationError(f"the '{method}' method needs the probe's training split: register it as a "
                                    "dataset (images with labels.csv) and give it as training_dataset",
                                    field="training_dataset")
        if options.get("C") is not None:
            raise RegistrationError("C is the regularization of a refit or a reweighted fit; it needs a "
                                    "training_dataset", field="options")
        return
    if method == "project":
        raise RegistrationError("'project' uses the audit's data only; drop training_dataset or choose 'refit' or "
                                "'reweight'", field="training_dataset")
    if dataset.project_id != audit.project_id:
        raise RegistrationError("the training dataset belongs to another project", field="training_dataset")
    if dataset.purpose != DatasetPurpose.AUDIT:
        raise RegistrationError(f"dataset '{dataset.name}' is unlabelled (registered for SAE training); a refit or "
                                "a reweighted fit needs the labels of the probe's training split",
                                field="training_dataset")
    unknown = sorted(set(dataset.class_names) - set(audit.probe.class_names))
    missing = sorted(set(audit.probe.class_names) - set(dataset.class_names))
    if unknown or missing:
        raise RegistrationError(
            f"the training dataset's classes must be the probe's ({', '.join(audit.probe.class_names)}): "
            + "; ".join(part for part in (f"unknown {', '.join(unknown)}" if unknown else "",
                                          f"missing {', '.join(missing)}" if missing else "") if part),
            field="training_dataset")


# --------------------------------------------------------------------------- the re-audit's answer

SLICE_GAP = 0.10  # a hurt slice is still hurt while its accuracy trails its counterpart's by this much or more


def verdict(correction: Correction, table: dict, diff: dict, tracking: list | None = None) -> dict:
    """Did the correction do its job, and what remains when it did not?

    It passes when the chosen flags are gone from the re-audit, no new probe flag appears, and no more than
    ``max_clean_drop`` of accuracy is lost on the images without any chosen latent. Besides these ``checks`` it
    reports, without failing on them: ``concept_remaining``, other latents of a chosen flag's concept the
    re-audit still flags; ``slices``, for each chosen flag the two slices its shortcut hurts (its class without
    the latent, the other images with it) against their counterparts, old and new gap, and whether each is still
    hurt (a gap of :data:`SLICE_GAP` or more). In words: ``reasons``, why it failed (what the gate fails on);
    ``meets``, the parts of the bar it meets; ``remains``, what is left of the shortcut either way."""
    chosen = list(correction.flags.all())
    still = {(e["class_name"], e["baseline"]["latent"]) for e in diff["changed"] + diff["unchanged"]
             if e["head"] == "probe"}
    remaining = [{"class_name": f.class_name, "latent": f.latent} for f in chosen if (f.class_name, f.latent) in still]
    concept_remaining = [{"class_name": f.class_name, "latent": latent, "flag_latent": f.latent}
                         for f in chosen for latent in (f.concept_latents or []) if latent != f.latent
                         and (f.class_name, latent) in still]
    concept_remaining += _still_tracking(tracking or [], diff, {(r["class_name"], r["latent"]) for r in
                                                                [*remaining, *concept_remaining]})
    new = [{"class_name": e["class_name"], "latent": e["current"]["latent"], "label": e["current"]["label"]}
           for e in diff["new"] if e["head"] == "probe"]
    clean = table["slices"].get(table.get("clean_slice")) or {}
    change = clean.get("change")
    allowed = correction.options["max_clean_drop"]
    checks = {"flags_removed": not remaining, "no_new_flags": not new,
              "clean_accuracy_kept": change is None or change >= -allowed - 1e-12}
    slices = hurt_slices(chosen, table)
    return {"passed": all(checks.values()), "checks": checks, "remaining": remaining, "new": new,
            "concept_remaining": concept_remaining, "slices": slices,
            "meets": _meets(checks, concept_remaining, slices), "remains": _remains(concept_remaining, slices),
            "clean_accuracy_change": change, "max_clean_drop": allowed,
            "reasons": _verdict_reasons(remaining, new, checks, change, allowed)}


def _still_tracking(tracking: list, diff: dict, known: set) -> list[dict]:
    """The re-audit's probe flags on latents that track a corrected concept (``tracking``: the correction's
    ``tracking_latents``) or belong to it, other than ``known`` (class, latent) pairs already reported."""
    out = []
    for e in diff["changed"] + diff["unchanged"] + diff["new"]:
        latent = e["current"]["latent"]
        if e["head"] != "probe" or (e["class_name"], latent) in known:
            continue
        for entry in tracking:
            share = entry["latents"].get(str(latent))
            if latent in entry["concept"] or share is not None:
                out.append({"class_name": e["class_name"], "latent": latent, "flag_latent": None,
                            "concept": entry["concept"], "share": share})
                break
    return out


def hurt_slices(flags, table: dict) -> list[dict]:
    """Per chosen flag (class k, latent l) the two slices its shortcut hurts, each against its counterpart:
    k's images without l against k's with it, and the other images with l against those without it; old and
    new accuracy of both, the gap (counterpart minus hurt slice) before and after, and ``still_hurt``."""
    rows = table.get("slices") or {}
    out = []
    for f in flags:
        other = _other_side(rows, f.class_name, f.latent)
        for hurt, counterpart in ((f"{f.class_name}, latent {f.latent} inactive", f"{f.class_name}, latent {f.latent} active"),
                                  (f"{other}, latent {f.latent} active", f"{other}, latent {f.latent} inactive")):
            a, b = rows.get(hurt) or {}, rows.get(counterpart) or {}
            old, new = _gap(b.get("old"), a.get("old")), _gap(b.get("new"), a.get("new"))
            out.append({"slice": hurt, "counterpart": counterpart, "n": a.get("n"), "old": a.get("old"),
                        "new": a.get("new"), "gap_before": old, "gap_after": new,
                        "still_hurt": new is not None and new >= SLICE_GAP})
    return out


def _other_side(rows: dict, class_name: str, latent: int) -> str:
    """How the proof table names the images of the other classes for this flag ("nevus", or "not melanoma")."""
    suffix = f", latent {latent} active"
    for name in rows:
        if name.endswith(suffix) and name != f"{class_name}{suffix}":
            return name[:-len(suffix)]
    return f"not {class_name}"


def _gap(counterpart, hurt):
    return None if counterpart is None or hurt is None else round(counterpart - hurt, 6)


def _meets(checks: dict, concept_remaining: list, slices: list) -> list[str]:
    """The parts of the bar the correction meets, in words."""
    said = {"flags_removed": "the chosen flags are gone", "no_new_flags": "nothing new is flagged",
            "clean_accuracy_kept": "accuracy on the images without the chosen latents is kept"}
    meets = [said[k] for k, ok in checks.items() if ok]
    if checks["flags_removed"] and not concept_remaining:
        meets.append("no other latent of the chosen concepts is flagged")
    measured = [s for s in slices if s["gap_after"] is not None]
    if measured and not any(s["still_hurt"] for s in measured):
        meets.append(f"no hurt slice trails its counterpart by {SLICE_GAP} or more")
    return meets


def _verdict_reasons(remaining, new, checks, change, allowed) -> list[str]:
    """Why the correction failed, one sentence per failed check (what a CI gate fails on)."""
    reasons = []
    if remaining:
        reasons.append("the re-audit still flags " + ", ".join(f"latent {r['latent']} for {r['class_name']}"
                                                               for r in remaining))
    if new:
        reasons.append("the re-audit flags what the original did not: " +
                       ", ".join(f"latent {n['latent']} ({n['label']}) for {n['class_name']}" for n in new))
    if not checks["clean_accuracy_kept"]:
        reasons.append(f"accuracy on images without any chosen latent fell by {-change:.3f}, more than the "
                       f"{allowed:.3f} allowed (max_clean_drop)")
    return reasons


def _remains(concept_remaining: list, slices: list) -> list[str]:
    """What is left of the shortcut, passed or not: other latents of its concept still flagged, slices still
    hurt."""
    out = []
    if concept_remaining:
        out.append("other latents of the chosen concepts are still flagged: " + ", ".join(
            f"latent {r['latent']} ({_with(r)}) for {r['class_name']}" for r in concept_remaining))
    for s in slices:
        if s["still_hurt"]:
            was = "" if s["gap_before"] is None else f" (the gap was {s['gap_before']:.3f})"
            out.append(f"still hurt: {s['slice']} at {s['new']:.3f}, {s['gap_after']:.3f} below {s['counterpart']}"
                       f"{was}")
    return out


def _with(row: dict) -> str:
    if row.get("flag_latent") is not None:
        return f"with latent {row['flag_latent']}"
    if row.get("share") is None:
        return "part of the corrected concept"
    return f"tracks the corrected concept: {row['share']:.0%} of its activation on its images"


@receiver(audit_finished)
def _answer_waiting_corrections(sender, audit, **kwargs) -> None:
    """A correction waiting for ``audit`` (its re-audit) finishes once the audit's final state is committed."""
    for correction in Correction.objects.filter(reaudit=audit, status=Status.RUNNING):
        transaction.on_commit(lambda pk=correction.pk: finish_after_reaudit(pk))


def finish_after_reaudit(correction_id: int) -> None:
    """Finish a correction whose re-audit finished: succeeded with the diff and the verdict, or failed/cancelled
    with its re-audit. Safe to call more than once (the reaper calls it too)."""
    with transaction.atomic():
        # of=self: PostgreSQL locks no row of the nullable side of an outer join (the re-audit)
        correction = Correction.objects.select_for_update(of=("self",)).filter(pk=correction_id).select_related(
            "reaudit", "audit").first()
        if correction is None or not correction.waiting_for_reaudit or correction.reaudit is None:
            return
        reaudit = correction.reaudit
        if reaudit.status == Status.SUCCEEDED:
            _answer_round(correction, reaudit)
        elif reaudit.status == Status.FAILED:
            correction.fail(f"the corrected probe's audit (audit {reaudit.pk}) failed: {reaudit.error}; the new "
                            f"probe '{correction.new_probe.name if correction.new_probe else '?'}' stays registered")
        elif reaudit.status == Status.CANCELLED:
            if correction.cancel_requested:
                correction.confirm_cancelled()
            else:
                correction.fail(f"the corrected probe's audit (audit {reaudit.pk}) was cancelled, so the correction "
                                "is not proven; audit the new probe again to see its flags")


def _answer_round(correction: Correction, reaudit: Audit) -> None:
    """The round's re-audit succeeded: its diff and verdict, and the round's record. When the re-audit still
    flags latents that track a corrected concept, or latents of one, and rounds are left, the correction goes
    back in the queue for the next round (``workers.engine.rounds.next_round`` says what it corrects);
    otherwise it succeeds."""
    diff = audit_diff(correction.audit, reaudit)
    result = dict(correction.result or {})
    shortcut = result["correction"].get("shortcut") or {}
    tracking = shortcut.get("tracking") or []
    result["reaudit"] = {"audit": reaudit.pk, "diff": diff}
    result["verdict"] = verdict(correction, result["correction"]["table"], diff, tracking)
    step = next_round(shortcut.get("concepts") or [], tracking, flagged_latents(reaudit), result.get("method") or "",
                      column=shortcut.get("estimate") == "column")
    result["rounds"] = [*(result.get("rounds") or []), _round_record(correction, result, step)]
    timings = {**correction.timings, "reaudit": correction.timings.get("reaudit", 0.0) + _seconds(reaudit)}
    if step["changed"] and len(result["rounds"]) < correction.options.get("rounds", 1):
        correction.next_round(result, timings)
        CORRECTION.enqueue_on_commit(correction.pk)
    else:
        correction.succeed(result, timings)


def flagged_latents(audit: Audit) -> list[int]:
    """The latents an audit flags for the probe: each probe flag's latent and the latents of its concept."""
    return list(dict.fromkeys(int(latent) for f in audit.flags.filter(head="probe").order_by("class_name", "rank")
                              for latent in [f.latent, *(f.concept_latents or [])]))


def _round_record(correction: Correction, result: dict, step: dict) -> dict:
    """One round as the proof shows it: the concepts it corrected, its probe and re-audit, the proof table, the
    verdict in short, and what its re-audit left for a next round (``added``: per concept the flagged latents
    that track it; ``split``: a concept's still flagged latents, corrected as a concept of their own)."""
    shortcut = result["correction"].get("shortcut") or {}
    v = result["verdict"]
    return {"round": len(result.get("rounds") or []) + 1, "concepts": shortcut.get("concepts") or [],
            "probe": correction.new_probe_id, "audit": result["reaudit"]["audit"],
            "table": result["correction"]["table"], "passed": v["passed"], "checks": v["checks"],
            "meets": v["meets"], "remains": v["remains"], "reasons": v["reasons"], "slices": v["slices"],
            "counts": result["reaudit"]["diff"]["counts"], "added": step["added"], "split": step["split"]}


def reaudit_corrected_probe(correction: Correction, path, result: dict, timings: dict) -> Audit:
    """The correction's last step: register the corrected probe at ``path`` as the next version of the audited
    probe, submit its re-audit (same model, data and SAE) and let the correction wait for it with its result so
    far. One transaction: a failure leaves no probe, no audit and no file."""
    audit, probe = correction.audit, None
    try:
        with transaction.atomic():
            round_ = len(result.get("rounds") or []) + 1
            note = f"correction {correction.pk}" + (f", round {round_}" if round_ > 1 else "")
            probe = add_probe_version(audit.probe, path, note=note,
                                      user=correction.created_by)
            reaudit = create_reaudit(audit, probe, context={"correction": correction.pk, "corrects_audit": audit.pk, "round": round_},
                                     user=correction.created_by)
            correction.wait_for_reaudit(probe, reaudit, result, timings)
    except Exception:
        if probe is not None:
            probe.file.storage.delete(probe.file.name)
        raise
    return reaudit


def answer_finished_reaudits() -> dict[str, list[int]]:
    """The reaper's part for corrections: finish those whose re-audit finished while no one was told (its
    worker stopped before it could)."""
    answered = []
    for correction in Correction.objects.filter(status=Status.RUNNING, stage=REAUDIT_STAGE,
                                                reaudit__status__in=FINISHED):
        finish_after_reaudit(correction.pk)
        answered.append(correction.pk)
    return {"answered": answered} if answered else {}


CORRECTION = register(JobKind(
    "correction", Correction, "workers.corrections.run_correction", related=("project", "reaudit"),
    fields=("audit", "flags", "method", "options", "training_dataset", "new_probe", "reaudit", "result"),
    reap=answer_finished_reaudits))


def _seconds(audit: Audit) -> float:
    if audit.started_at and audit.finished_at:
        return (audit.finished_at - audit.started_at).total_seconds()
    return 0.0
