"""One machine, one command: migrate, start a Celery worker, serve the web app and API."""
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from audit_service.audits import processes


class Command(BaseCommand):
    help = "Run the service on this machine: web server + one Celery worker (SQLite and a filesystem broker by default)."

    def add_arguments(self, parser):
        parser.add_argument("--addr", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--workers", type=int, default=1, help="worker processes (one audit each)")

    def handle(self, *args, addr, port, workers, **options):
        call_command("migrate", interactive=False, verbosity=0)
        log_dir = settings.VAR_DIR / "logs"
        started = []
        # SIGTERM (systemd, docker stop), Ctrl-C and SIGHUP stop the children before we exit, never leave them
        # running as orphans; a signal that lands between two starts still stops the first child
        with processes.stop_signals_raise():
            try:
                started.append(worker := processes.start_worker(log_dir / "worker.log", workers))
                started.append(web := processes.start_web(addr, port, log_dir / "web.log"))
                self.stdout.write(f"web: http://{addr}:{port}/  (log {log_dir / 'web.log'})\n"
                                  f"worker: pid {worker.pid}  (log {log_dir / 'worker.log'})\nCtrl-C stops both.")
                web.wait()
            except processes.Stopped as stopped:
                self.stdout.write(f"{stopped}: stopping the web server and the worker")
            finally:
                processes.stop(*started)
