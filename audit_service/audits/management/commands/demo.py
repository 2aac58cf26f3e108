"""The main job on a fresh machine: the skin-lesion case study, audited through the running service.

It builds (once, cached under ~/.cache/clip-audit/casestudy/) generated dermoscopy-like
images with planted artifacts, a tiny OpenCLIP model trained on them from
scratch, and a probe trained on a split where rulers come with melanomas;
then it starts the web server and a worker, registers model, probe and
dataset through the HTTP API, submits the audit, follows its progress and
prints what it found and where to look. Re-running reuses the cached files
and registrations.
"""
import sys
import time

import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from audit_service.audits import processes
from audit_service.audits.report import metadata_hits
from audit_service.projects.models import Membership, Project, Role
from audit_service.registry.services import sha256_of

DEMO_USER = "demo"
DEMO_PASSWORD = "demo-password"  # the demo serves 127.0.0.1 only
DEMO_PROJECT = "Demo: skin lesions"


def _file_sha(path) -> str:
    with open(path, "rb") as fh:
        return sha256_of(fh)


def _named(flag: dict) -> str:
    """The flag's name with its confidence and evidence, or what it likely is when it is not named."""
    ev = flag.get("label_evidence") or {}
    evidence = (f"; {ev['margin']:.1f} SD above '{ev['runner_up']}'" if ev.get("runner_up") else "") + (
        f"; also {', '.join(repr(a) for a in ev['agreeing'])}" if ev.get("agreeing") else "")
    confidence = f"confidence {flag.get('label_confidence') or 0:.2f}{evidence}"
    if flag["label"] == "unlabelled":
        return f"likely '{flag.get('closest_concept')}', not named ({confidence})"
    return f"'{flag['label']}' ({confidence})"


class Command(BaseCommand):
    help = "Generate a small case, run a real audit of it through the service and print where to look."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--exit", action="store_true", help="stop the server when the audit is done")

    def handle(self, *args, port, exit, **options):
        call_command("migrate", interactive=False, verbosity=0)
        token = self._demo_account()
        assets = self._assets()
        base = f"http://127.0.0.1:{port}"
        logs = settings.VAR_DIR / "logs"
        worker = processes.start_worker(logs / "worker.log")
        web = processes.start_web("127.0.0.1", port, logs / "web.log")
        try:
            processes.wait_until_up(f"{base}/api/v1/", web)
            api = requests.Session()
            api.headers["Authorization"] = f"Token {token}"
            from workers.casestudy.build import audit_options

            audit = self._run(api, base, assets, audit_options())
            if audit["status"] != "succeeded":
                raise CommandError(f"the audit {audit['status']}: {audit['error'] or 'see ' + str(logs)}")
            self._report(api, base, audit)
            self.stdout.write("\nThe same audit with only the defaults (class names, generic prompts, the built-in "
                              "vocabulary), as a user who knows nothing of the case would run it:")
            defaults = self._run(api, base, assets, {})
            if defaults["status"] != "succeeded":
                raise CommandError(f"the audit {defaults['status']}: {defaults['error'] or 'see ' + str(logs)}")
            self._report(api, base, defaults)
            if not exit:
                self.stdout.write("\nThe service keeps running so you can open the links; Ctrl-C stops it.")
                web.wait()
        except KeyboardInterrupt:
            pass
        finally:
            processes.stop(web, worker)

    # ------------------------------------------------------------------ set-up
    def _demo_account(self) -> str:
        User = get_user_model()
        user, created = User.objects.get_or_create(username=DEMO_USER, defaults={"is_staff": True,
                                                                                  "is_superuser": True})
        if created:
            user.set_password(DEMO_PASSWORD)
            user.save()
        project, _ = Project.objects.get_or_create(name=DEMO_PROJECT)
        Membership.objects.get_or_create(project=project, user=user, defaults={"role": Role.OWNER})
        self.project_id = project.id
        from audit_service.accounts.models import ApiToken

        ApiToken.objects.filter(user=user, name="demo").delete()  # keys cannot be read back: issue a fresh one
        return ApiToken.issue(user, "demo")[1]

    def _assets(self) -> dict:
        from workers.casestudy.build import CaseConfig, build_case, default_cache, format_metrics

        case = build_case(default_cache(), CaseConfig(), log=self.stdout.write)
        self.case = case
        self.stdout.write(format_metrics(case))
        return {"config": case["model_config"], "checkpoint": case["checkpoint"], "probe": case["probe"],
                "dataset": case["audit_dataset"]}

    # ------------------------------------------------------------------ the service path
    def _find_or_create(self, api, base, kind: str, sha_field: str, sha: str, data: dict, files: dict) -> dict:
        listing = api.get(f"{base}/api/v1/{kind}/", params={"project": self.project_id}).json()
        for obj in listing["results"]:
            if obj.get(sha_field) == sha:
                return obj
        opened = {k: open(v, "rb") for k, v in files.items()}
        try:
            response = api.post(f"{base}/api/v1/{kind}/", data={"project": self.project_id, **data}, files=opened)
        finally:
            for fh in opened.values():
                fh.close()
        if response.status_code != 201:
            raise CommandError(f"registering {kind} failed: {response.status_code} {response.text}")
        return response.json()

    def _run(self, api, base, assets, config: dict) -> dict:
        model_sha, probe_sha, data_sha = (_file_sha(assets[k]) for k in ("checkpoint", "probe", "dataset"))
        model = self._find_or_create(api, base, "models", "checkpoint_sha256", model_sha, {"name": "lesion CLIP"},
                                     {"model_config": assets["config"], "checkpoint": assets["checkpoint"]})
        probe = self._find_or_create(api, base, "probes", "sha256", probe_sha,
                                     {"name": "melanoma probe (biased split)", "clip_model": model["id"]},
                                     {"file": assets["probe"]})
        dataset = self._find_or_create(api, base, "datasets", "sha256", data_sha, {"name": "lesions (held out)"},
                                       {"archive": assets["dataset"]})
        self.stdout.write(f"Registered model {model['id']}, probe {probe['id']}, dataset {dataset['id']} "
                          f"({dataset['n_images']} images).")
        response = api.post(f"{base}/api/v1/audits/", json={
            "project": self.project_id, "clip_model": model["id"], "probe": probe["id"], "dataset": dataset["id"],
            "config": config, "context": {"case_study": {"config": self.case["config"],
                                                                   "metrics": self.case["metrics"]}}})
        if response.status_code != 201:
            raise CommandError(f"submitting the audit failed: {response.status_code} {response.text}")
        audit_id = response.json()["id"]
        start = time.monotonic()
        while True:
            audit = api.get(f"{base}/api/v1/audits/{audit_id}/").json()
            bar = "#" * int(audit["percent"] / 4)
            sys.stdout.write(f"\raudit {audit_id}: [{bar:<25}] {audit['percent']:5.1f}% {audit['status']:<9} "
                             f"{audit['stage']:<10} {time.monotonic() - start:5.0f}s")
            sys.stdout.flush()
            if audit["status"] in ("succeeded", "failed", "cancelled"):
                sys.stdout.write("\n")
                return audit
            time.sleep(1)

    def _report(self, api, base, audit) -> None:
        audit_id = audit["id"]
        summary = api.get(f"{base}/api/v1/audits/{audit_id}/summary/").json()
        flags = api.get(f"{base}/api/v1/audits/{audit_id}/flags/", params={"head": "probe"}).json()["results"]
        self.stdout.write(f"\nSAE: {summary['sae']['n_latents']} latents, k={summary['sae']['k']}, "
                          f"FVU {summary['sae']['fvu']:.3f}, dead {summary['sae']['dead_fraction']:.1%}")
        for name, c in summary["classes"].items():
            self.stdout.write(f"  {name:<10} probe acc {c['probe_accuracy']:.2f}  zero-shot acc "
                              f"{c['zero_shot_accuracy']:.2f}  flags probe/zero-shot {c['flags']['probe']}/"
                              f"{c['flags']['zero_shot']}  share on flags probe {c['probe_share']:.2f} vs "
                              f"zero-shot {c['zero_shot_share']:.2f}")
        planted = f"with {self.case['config']['artifact']}"
        if not flags:
            self.stdout.write("  no probe flags")
        for f in flags[:10]:
            mark = "  <- the planted shortcut" if f["label"] == planted and f["class_name"] == \
                self.case["config"]["toward"] else ""
            hits = metadata_hits(f.get("metadata_auroc") or {}, 2)
            auroc = ", ".join(f"{h['name']} (AUROC {h['auroc']:.2f})" for h in hits)
            stability = f.get("stability") or {}
            found = f"found by {stability['found_by']} of {stability['of']} dictionaries" if stability else ""
            self.stdout.write(f"  flag: {f['class_name']:<9} rank {f['rank']} latent {f['latent']:<3} "
                              f"{_named(f)} {found}; fires on {auroc}; "
                              f"share probe {f['probe_share']:.2f} vs zero-shot {f['zero_shot_share']:.2f}{mark}\n"
                              f"        {(f.get('confirmation') or {}).get('text', '')}\n"
                              f"        harm: {(f.get('harm') or {}).get('summary', 'n/a')}")
        folder = settings.VAR_DIR / "demo"
        folder.mkdir(parents=True, exist_ok=True)
        saved = {}
        for fmt, name in (("html", f"audit-{audit_id}-report.html"), ("json", f"audit-{audit_id}.json")):
            response = api.get(f"{base}/api/v1/audits/{audit_id}/download/{fmt}/")
            response.raise_for_status()
            (folder / name).write_bytes(response.content)
            saved[fmt] = folder / name
        self.stdout.write(f"\nWhere to look (sign in as {DEMO_USER} / {DEMO_PASSWORD}):\n"
                          f"  report:   {base}/audits/{audit_id}/report/\n"
                          f"  progress: {base}/audits/{audit_id}/\n"
                          f"  API:      {base}/api/v1/audits/{audit_id}/summary/ and .../flags/\n"
                          f"  admin:    {base}/admin/audits/flag/?audit__id__exact={audit_id}\n"
                          f"  saved:    {saved['html']} (the report, opens offline)\n"
                          f"            {saved['json']} (the full result)")
