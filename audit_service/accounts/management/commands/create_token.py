from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from audit_service.accounts.models import ApiToken


class Command(BaseCommand):
    help = "Create an API token for a user and print its key (shown once; only its digest is stored)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="what the token is for, e.g. 'ci-pipeline'")

    def handle(self, *args, username, name, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user '{username}'; create one with `python manage.py createsuperuser`")
        _, key = ApiToken.issue(user, name)
        self.stdout.write(key)
