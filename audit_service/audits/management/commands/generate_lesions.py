"""Write a split of synthetic dermoscopy-like images (PNG + labels.csv, optionally zipped for upload)."""
from pathlib import Path

import numpy as np
from django.core.management.base import BaseCommand, CommandError

from workers.casestudy import images


class Command(BaseCommand):
    help = ("Generate labelled synthetic skin-lesion images with planted artifacts. --strength 0 keeps every "
            "artifact independent of the class; above 0, --artifact is tied to --toward.")

    def add_arguments(self, parser):
        parser.add_argument("out", type=Path, help="folder to write (images/ and labels.csv)")
        parser.add_argument("--n", type=int, default=800)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--artifact", default="a ruler", choices=images.ARTIFACTS)
        parser.add_argument("--toward", default="melanoma", choices=images.CLASSES)
        parser.add_argument("--strength", type=float, default=0.0)
        parser.add_argument("--rate", type=float, default=0.3, help="chance of each independent artifact")
        parser.add_argument("--zip", action="store_true", help="also write OUT.zip in the upload format")

    def handle(self, *args, out, n, seed, artifact, toward, strength, rate, zip, **options):
        if not 0.0 <= strength <= 1.0:
            raise CommandError("--strength must be within [0, 1]")
        rates = (images.biased_rates(artifact, toward, strength, rate) if strength > 0
                 else images.independent_rates(rate))
        samples = images.draw_samples(n, np.random.default_rng([seed, 0]), rates)
        images.write_split(out, samples, np.random.default_rng([seed, 1]))
        self.stdout.write(f"wrote {n} images and labels.csv to {out}")
        if zip:
            from workers.casestudy.build import zip_split

            self.stdout.write(f"wrote {zip_split(out, out.with_suffix('.zip'))}")
