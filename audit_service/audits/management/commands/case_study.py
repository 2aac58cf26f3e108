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
        parser.add_argument("--patch-size", type=int, default=8, choices=(4, 8),
                            help="the tiny CLIP's patch in pixels (4: a 16 x 16 grid on which thin artifacts such "
                                 "as the ruler fill whole patches, for finer heatmaps; its own model, trained once)")
        parser.add_argument("--check-seeds", type=int, nargs="*", default=None, dest="seeds_to_check",
                            help="audit these seeds (default 0 1 2) and check the known answer")

    def handle(self, *args, seed, strength, patch_size, seeds_to_check: list | None, **options):
        case = build_case(default_cache(), CaseConfig(seed=seed, strength=strength, patch_size=patch_size),
                          log=self.stdout.write)
        self.stdout.write(format_metrics(case))
        if seeds_to_check is not None:
            check_seeds(seeds_to_check or [0, 1, 2], strength, log=self.stdout.write, patch_size=patch_size)
