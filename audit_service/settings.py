"""Settings: defaults serve one machine with nothing else installed; production is environment variables.

Every variable is listed in README.md ("Environment variables").
"""
from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import env_bool, env_choice, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("CLIP_AUDIT_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DJANGO_DEBUG", True)
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY (or DJANGO_SECRET_KEY_FILE) must be set when DJANGO_DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key-for-one-machine"
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "audit_service.accounts",
    "audit_service.projects",
    "audit_service.registry",
    "audit_service.audits",
    "audit_service.web",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "audit_service.urls"
WSGI_APPLICATION = "audit_service.wsgi.application"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [BASE_DIR / "templates"],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

# --------------------------------------------------------------------------- storage
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30  # worker and web share one file
    # a transaction takes the write lock when it begins, so checks made inside one (a project's room for another
    # job) hold until it commits, as a row lock does on PostgreSQL
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media")))
MEDIA_URL = "/media-not-served/"  # private files are only served through permission-checked views
TIME_ZONE = env_str("TIME_ZONE", "UTC")  # how pages show times; stored times are always UTC
USE_TZ = True
STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGE_BACKEND = env_choice("STORAGE_BACKEND", "local", ("local", "s3"))
if STORAGE_BACKEND == "s3":
    default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env_str("S3_BUCKET"),
            "endpoint_url": env_str("S3_ENDPOINT_URL"),
            "access_key": env_str("S3_ACCESS_KEY_ID"),
            "secret_key": env_str("S3_SECRET_ACCESS_KEY"),
            "region_name": env_str("S3_REGION"),
            "default_acl": None,
            "querystring_auth": True,
            "file_overwrite": False,
        },
    }
    if not default_storage["OPTIONS"]["bucket_name"]:
        raise ImproperlyConfigured("STORAGE_BACKEND=s3 needs S3_BUCKET")
else:
    default_storage = {"BACKEND": "django.core.files.storage.FileSystemStorage"}
STORAGES = {
    "default": default_storage,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Worker scratch space: activation caches and SAEs of running audits (local disk on each worker).
AUDIT_WORK_DIR = Path(env_str("AUDIT_WORK_DIR", str(VAR_DIR / "work")))
# where pretrained tags' and hf-hub: models' weights are cached (downloaded there when online); "" for Hugging
# Face's own cache (HF_HOME)
MODEL_CACHE_DIR = env_str("MODEL_CACHE_DIR", "") or None

# --------------------------------------------------------------------------- uploads
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
MAX_UPLOAD_BYTES = env_int("MAX_UPLOAD_BYTES", 2 * 1024 ** 3, minimum=1)
MAX_DATASET_IMAGES = env_int("MAX_DATASET_IMAGES", 200_000, minimum=1)
MAX_DATASET_BYTES = env_int("MAX_DATASET_BYTES", 20 * 1024 ** 3, minimum=1)  # uncompressed
MAX_IMAGE_PIXELS = env_int("MAX_IMAGE_PIXELS", 40_000_000, minimum=1)
# Every entry of an archive counts (folders and empty files too), checked before any member is read or written.
MAX_ARCHIVE_MEMBERS = env_int("MAX_ARCHIVE_MEMBERS", MAX_DATASET_IMAGES + 1000, minimum=1)
# Server folders a dataset may be registered from by reference (absolute paths, comma-separated; empty: none).
# Workers copy the images they need from there, so mount each folder at the same path on every worker.
DATASET_ROOTS = env_list("DATASET_ROOTS", [])
if any(not Path(root).is_absolute() for root in DATASET_ROOTS):
    raise ImproperlyConfigured(f"DATASET_ROOTS must list absolute folders, got {','.join(DATASET_ROOTS)}")
# Prefixes of the media store's S3 bucket a dataset may be registered from by reference (comma-separated, e.g.
# datasets/dermatology; empty: none). The service's own projects/ area is never one.
DATASET_S3_PREFIXES = [p.strip("/") for p in env_list("DATASET_S3_PREFIXES", []) if p.strip("/")]
# A model's size, counted from its config before anything is built (the web process builds a model to check a
# checkpoint; workers build it for every audit). Every open_clip ViT fits the defaults (ViT-e-14: 4.6e9
# parameters, 56 blocks, width 1792).
MODEL_MAX_PARAMETERS = env_int("MODEL_MAX_PARAMETERS", 5_000_000_000, minimum=1)
MODEL_MAX_LAYERS = env_int("MODEL_MAX_LAYERS", 128, minimum=1)  # blocks per tower
MODEL_MAX_WIDTH = env_int("MODEL_MAX_WIDTH", 4096, minimum=1)  # per tower
MODEL_MAX_IMAGE_SIZE = env_int("MODEL_MAX_IMAGE_SIZE", 1024, minimum=1)  # pixels, the longer side
MODEL_MAX_PATCHES = env_int("MODEL_MAX_PATCHES", 4096, minimum=1)  # tokens per image besides the CLS token
MODEL_MAX_CONTEXT_LENGTH = env_int("MODEL_MAX_CONTEXT_LENGTH", 1024, minimum=1)  # text tokens
# Latents of an SAE trained elsewhere, read from its config and checked (with the weights' shapes, from their
# header) before anything of that width is allocated (2^20: far wider than a CLIP SAE is trained).
SAE_MAX_LATENTS = env_int("SAE_MAX_LATENTS", 1_048_576, minimum=1)

# --------------------------------------------------------------------------- API
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # the token class first: an unauthenticated API call gets 401 with "WWW-Authenticate: Token"
        "audit_service.accounts.authentication.HashedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": env_int("API_PAGE_SIZE", 50, minimum=1),
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_CLASSES": ["audit_service.accounts.throttling.PerTokenRateThrottle"],
    "DEFAULT_PARSER_CLASSES": ["audit_service.parsers.JSONParser", "rest_framework.parsers.FormParser",
                               "rest_framework.parsers.MultiPartParser"],
}
# Requests per API token (or per signed-in user, or per anonymous address); counted in the Django cache, so
# several web processes share one budget only with a shared cache (CACHE_URL=redis://...).
API_RATE_PER_TOKEN = env_str("API_RATE_PER_TOKEN", "1200/min")
API_RATE_PER_USER = env_str("API_RATE_PER_USER", "1200/min")
API_RATE_ANONYMOUS = env_str("API_RATE_ANONYMOUS", "60/min")
# --------------------------------------------------------------------------- throttling of anonymous callers
# Refused calls without a valid key count against API_RATE_ANONYMOUS too (DRF checks credentials before throttles).
REST_FRAMEWORK["EXCEPTION_HANDLER"] = "audit_service.accounts.exceptions.exception_handler"
# Proxies in front of the web process that append to X-Forwarded-For; 0: callers connect directly and only
# REMOTE_ADDR tells them apart. The anonymous rate and the sign-in lockout count per caller address.
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0, minimum=0)
# Sign-in lockout (django-axes, its attempts in the database): SIGNIN_FAILURE_LIMIT wrong passwords for one user
# name from one address lock that pair out, the right password included, until SIGNIN_COOLOFF_MINUTES pass
# without another attempt. Covers every password form (the sign-in page, the admin's, the API browser's).
INSTALLED_APPS.append("axes")
MIDDLEWARE.append("axes.middleware.AxesMiddleware")  # answers a locked-out sign-in with the page saying so
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_ENABLED = env_bool("SIGNIN_LOCKOUT_ENABLED", True)
AXES_FAILURE_LIMIT = env_int("SIGNIN_FAILURE_LIMIT", 10, minimum=1)
SIGNIN_COOLOFF_MINUTES = env_int("SIGNIN_COOLOFF_MINUTES", 15, minimum=1)
AXES_COOLOFF_TIME = SIGNIN_COOLOFF_MINUTES / 60  # axes reads a float as hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]  # a stranger elsewhere cannot lock a user out
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "audit_service.accounts.throttling.client_address"
AXES_LOCKOUT_CALLABLE = "audit_service.web.views.signin_locked_out"
if env_str("CACHE_URL", ""):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": env_str("CACHE_URL", "")}}
SPECTACULAR_SETTINGS = {
    "TITLE": "CLIP shortcut audit API",
    "DESCRIPTION": "Register OpenCLIP models, linear probes and datasets, submit audits for shortcut learning, "
                   "read and review their flags, download reports. Authenticate with `Authorization: Token <key>`.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",  # the docs page's assets ship with the project: it works offline
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"

# --------------------------------------------------------------------------- Celery
# Default: kombu's filesystem transport, so one machine needs no broker server.
BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # longer than the longest stage: Redis redelivers unacknowledged tasks after this many seconds
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 12 * 3600, minimum=60),
}
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS.update({
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        # its exchange tables: without this, kombu writes them to ./control in whatever folder the process runs
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
        # how often the folder is looked at: a sharded audit sends dozens of short tasks one after another
        "polling_interval": 0.2,
    })
# Audit results live in the database. The result backend only counts the finished shards of a chord (a
# sharded audit's stage): Redis when the broker is Redis, else a folder on this machine (one-machine default).
CELERY_RESULT_BACKEND = env_str(
    "CELERY_RESULT_BACKEND",
    CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://"))
    else f"file://{VAR_DIR / 'celery-results'}")
CELERY_RESULT_EXPIRES = 7 * 24 * 3600
CELERY_TASK_IGNORE_RESULT = True  # the per-shard tasks keep theirs (their chords need them)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
# everything that runs the model, the SAE or reads activations goes to the gpu queue: every job kind's task and a
# sharded audit's steps (audits.jobs.route); the reaper to default
CELERY_TASK_ROUTES = ("audit_service.audits.jobs.route",)
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

AUDIT_MAX_ATTEMPTS = env_int("AUDIT_MAX_ATTEMPTS", 3, minimum=1)
# Upper bounds of audit options, checked when an audit is submitted: the engine's schema types every option and
# bounds what it can run at all, these bound what this server's workers run. Options that the audited data or
# model bound more tightly are checked against them too (audits/services.py), and the SAE's training memory is
# estimated against WORKER_TASK_MEMORY_MB.
AUDIT_MAX_BATCH_SIZE = env_int("AUDIT_MAX_BATCH_SIZE", 512, minimum=1)  # images per forward pass
AUDIT_MAX_SAE_LATENTS = env_int("AUDIT_MAX_SAE_LATENTS", 65536, minimum=2)  # also bounds sae.k and sae.aux_k
AUDIT_MAX_SAE_BATCH_SIZE = env_int("AUDIT_MAX_SAE_BATCH_SIZE", 16384, minimum=1)  # activation vectors per step
AUDIT_MAX_SAE_STEPS = env_int("AUDIT_MAX_SAE_STEPS", 200_000, minimum=1)  # also bounds sae.dead_after_steps
AUDIT_MAX_REFERENCES = env_int("AUDIT_MAX_REFERENCES", 128, minimum=2)  # reference images per latent
AUDIT_MAX_FAITHFULNESS_STEPS = env_int("AUDIT_MAX_FAITHFULNESS_STEPS", 100, minimum=1)  # deletion curve length
# Images per shard of one audit. An audit of more images is spread over the workers: extraction, attribution
# and causal confirmation run per shard as separate tasks; the SAE is trained once on the pooled activations.
AUDIT_SHARD_SIZE = env_int("AUDIT_SHARD_SIZE", 4096, minimum=1)
AUDIT_PROGRESS_EVERY_SECONDS = 1.0
# A running audit's worker writes a heartbeat this often; an audit whose heartbeat is older than
# AUDIT_STALE_AFTER_SECONDS (or whose worker process on this host is gone) is requeued by the reaper, or failed
# once it used up AUDIT_MAX_ATTEMPTS.
AUDIT_HEARTBEAT_SECONDS = env_int("AUDIT_HEARTBEAT_SECONDS", 15, minimum=1)
AUDIT_STALE_AFTER_SECONDS = env_int("AUDIT_STALE_AFTER_SECONDS", 120, minimum=2)
# A queued audit whose task message is older than this is sent again (a broker that lost its queue on a restart
# loses no audit; a duplicate message is ignored by the worker).
AUDIT_REQUEUE_QUEUED_AFTER_SECONDS = env_int("AUDIT_REQUEUE_QUEUED_AFTER_SECONDS", 1800, minimum=1)
AUDIT_REAP_EVERY_SECONDS = env_int("AUDIT_REAP_EVERY_SECONDS", 60, minimum=1)
AUDIT_STAGE_TIME_LIMIT = env_int("AUDIT_STAGE_TIME_LIMIT", 6 * 3600, minimum=1)  # seconds per engine stage
# Memory ceiling of one task: the worker process's resident memory (with the model and libraries it keeps), read
# at the engine's checkpoints; over it the audit fails saying which option to lower, and the process lives on.
# Celery replaces a pool process still above it after its task (memory the allocator kept).
WORKER_TASK_MEMORY_MB = env_int("WORKER_TASK_MEMORY_MB", 8192, minimum=256)
CELERY_WORKER_MAX_MEMORY_PER_CHILD = WORKER_TASK_MEMORY_MB * 1024  # KiB
CELERY_BEAT_SCHEDULE = {"reap-stale-audits": {"task": "workers.tasks.reap_stale_audits",
                                              "schedule": float(AUDIT_REAP_EVERY_SECONDS)}}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # open_clip logs every model creation on the root logger at INFO: keep the root at WARNING
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "WARNING")},
    "loggers": {name: {"level": env_str("APP_LOG_LEVEL", "INFO")} for name in ("workers", "audit_service")},
}

if not DEBUG:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
