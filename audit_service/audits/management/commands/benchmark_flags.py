"""The known-answer benchmark of the flags: planted shortcuts and controls audited with the defaults."""
import json
import shlex
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from workers.casestudy.benchmark import Grid, pool_reports, run_grid, write_report
from workers.casestudy.images import ARTIFACTS, CLASSES


class Command(BaseCommand):
    help = ("Build planted cases (every artifact tied in turn to each class, over seeds, plus controls), audit each "
            "with the defaults a user who knows only the class names gets, score the flags against the generator's "
            "ground truth (recall, precision, false alarms on controls, labels, probe vs zero-shot) and write "
            "docs/benchmark.md and docs/benchmark.json. Exits 1 when a target is missed.")

    def add_arguments(self, parser):
        parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        parser.add_argument("--artifacts", nargs="+", default=list(ARTIFACTS), choices=ARTIFACTS)
        parser.add_argument("--classes", nargs="+", default=list(CLASSES), choices=CLASSES)
        parser.add_argument("--no-controls", action="store_true")
        parser.add_argument("--n-audit", type=int, default=2000, help="images in each held-out (audited) split")
        parser.add_argument("--options", default="{}", help="JSON audit options on top of the defaults")
        parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for benchmark.md/.json")
        parser.add_argument("--patch-size", type=int, default=8, choices=(4, 8),
                            help="the case models' patch in pixels (4: thin artifacts fill whole patches; its own "
                                 "tiny CLIP per seed, trained on the first run)")
        parser.add_argument("--no-corrections", action="store_true", help="skip the corrections and re-audits")
        parser.add_argument("--corrections", nargs="+", metavar="METHOD", choices=Grid.corrections,
                            help="run only these correction methods (default: every one: "
                                 f"{', '.join(repr(m) for m in Grid.corrections)})")
        parser.add_argument("--no-stability", action="store_true", help="skip the audits with other SAE seeds")
        parser.add_argument("--no-checklist", action="store_true",
                            help="skip asking about every artifact as a suspect")
        parser.add_argument("--pool", type=Path, nargs="+", metavar="JSON",
                            help="audit nothing: write one report from the scored cases of these runs' "
                                 "benchmark.json (the same grid on different seeds), every figure computed again "
                                 "over all of them")

    def handle(self, *args, seeds, artifacts, classes, no_controls, n_audit, options, out, patch_size,
               no_corrections, no_stability, no_checklist, pool=None, corrections=None, **kwargs):
        command = "python manage.py benchmark_flags " + shlex.join(sys.argv[2:])  # quoted as a shell reads it
        if pool:
            return self._finish(self._pooled(pool), out, command.strip())
        try:
            overrides = json.loads(options)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--options is not JSON: {exc}") from exc
        if no_corrections and corrections:
            raise CommandError("--no-corrections and --corrections ask for opposite things: give one")
        grid = Grid(seeds=tuple(seeds), artifacts=tuple(artifacts), classes=tuple(classes),
                    controls=not no_controls, n_audit=n_audit, audit_options=overrides, patch_size=patch_size,
                    corrections=() if no_corrections else tuple(corrections or Grid.corrections),
                    stability_cases=0 if no_stability else None, checklist=not no_checklist)
        self.stdout.write(f"{len(grid.cases())} cases; the first run on a machine trains one tiny CLIP per seed")
        self._finish(run_grid(grid, log=self.stdout.write), out, command.strip())

    def _pooled(self, files: list[Path]) -> dict:
        reports = []
        for path in files:
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                raise CommandError(f"--pool {path}: cannot read a benchmark.json there ({exc})") from exc
            if not isinstance(reports[-1], dict) or not {"grid", "cases", "seconds"} <= set(reports[-1]):
                raise CommandError(f"--pool {path}: not a benchmark.json written by this command (no grid, cases "
                                   "or seconds)")
        try:
            return pool_reports(reports)
        except ValueError as exc:
            raise CommandError(f"--pool: {exc}") from exc

    def _finish(self, report: dict, out: Path, command: str):
        md, js = write_report(report, out, command)
        self.stdout.write(json.dumps(report["summary"], indent=1))
        self.stdout.write(f"targets met: {report['met']}\nwrote {md} and {js}")
        if report["digest_mismatches"]:
            raise CommandError("the case models differ from the recorded builds, so these figures measure other "
                               "cases: " + "; ".join(report["digest_mismatches"]) + " (rebuild with the same "
                               "code on the same kind of CPU, or record this machine's models as a new reference)",
                               returncode=1)
        if not all(report["met"].values()):
            raise CommandError("a target was missed (see the table above)", returncode=1)
