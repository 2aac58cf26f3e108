"""Build the skin-lesion case study, print its numbers, and optionally check its known answer over seeds."""
from django.core.management.base import BaseCommand

from workers.casestudy.build import CaseConfig, build_case, default_cache, format_metrics
from workers.casestudy.check import check_seeds


class Command(BaseCommand):
    help = ("Build (or reuse) the case study: generated images, a tiny CLIP trained from scratch, a biased probe; "
            "print the shortcut in numbers. --check-seeds audits each seed and checks the known answer.")

    def add_arguments(self, parser):
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--strength", type=float, default=0.8)
        parser.add_argument("--check-seeds", type=int, nargs="*", default=None, dest="seeds_to_check",
                            help="audit these seeds (default 0 1 2) and check the known answer")

    def handle(self, *args, seed, strength, seeds_to_check: list | None, **options):
        case = build_case(default_cache(), CaseConfig(seed=seed, strength=strength), log=self.stdout.write)
        self.stdout.write(format_metrics(case))
        if seeds_to_check is not None:
            check_seeds(seeds_to_check or [0, 1, 2], strength, log=self.stdout.write)
