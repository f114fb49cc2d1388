"""Labsite settings: every value comes from the environment (see README), typed and checked."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from labsite.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("LABSITE_DATA_DIR", str(BASE_DIR / "data"))).resolve()
DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
# The database, the secret key, every host's SSH key and the runs' logs live here: the server's
# alone (runs on the local host execute as another user and must not read it).
if DATA_DIR.stat().st_uid == os.geteuid():
    DATA_DIR.chmod(0o700)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated once and kept (0600) in the data dir."""
    key = env_str("SECRET_KEY", "")
    if key:
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
PORT = env_int("PORT", 8000, minimum=1)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "django_htmx",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "labsite",
    "clusters",
    "experiments",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "labsite.urls"
WSGI_APPLICATION = "labsite.wsgi.application"
ASGI_APPLICATION = "labsite.asgi.application"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "labsite.roles.roles_context",
            ],
        },
    },
]


def _databases() -> dict:
    url = env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'labsite.sqlite3'}")
    try:
        db = dj_database_url.parse(url, conn_max_age=env_int("DB_CONN_MAX_AGE", 60, minimum=0))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from exc
    if db["ENGINE"] == "django.db.backends.sqlite3":
        # Web, worker and beat write one file at once: WAL, a busy timeout and
        # BEGIN IMMEDIATE keep them from meeting "database is locked". Connections persist as
        # on PostgreSQL (a reader outside a transaction holds no snapshot in WAL mode): a new
        # one per request, with its PRAGMAs, was a third of an agent's `GET /runs/{id}`.
        db["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    elif db["ENGINE"] == "django.db.backends.postgresql":
        # Django's backend, with a health check that sends nothing while the server has said
        # nothing (labsite/db/postgresql/base.py).
        db["ENGINE"] = "labsite.db.postgresql"
        db["CONN_HEALTH_CHECKS"] = True
    return {"default": db}


DATABASES = _databases()
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
# A lab server is served over HTTPS by a reverse proxy in front of gunicorn (README: "Serving a
# lab over HTTPS"); LABSITE_HTTPS=true turns on everything that needs: secure cookies, the
# redirect, HSTS, and trusting the proxy's X-Forwarded-Proto. The single-machine default is
# plain HTTP on 127.0.0.1.
HTTPS = env_bool("LABSITE_HTTPS", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", HTTPS)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", HTTPS)
# Load balancers and compose health checks call the health endpoint over plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^api/health$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000 if HTTPS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", HTTPS)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Preloading HSTS is a submission to the browsers' list, a lab's own decision: not a default.
SILENCED_SYSTEM_CHECKS = ["security.W021"]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "labsite.auth.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["labsite.renderers.FastJSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["labsite.parsers.JSONParser"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "labsite.api.Pagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "labsite.api.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Labsite API",
    "DESCRIPTION": "Runs, sweeps, plans and GPUs of the lab. Send `X-Auth-Token: <token>`.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "labsite.schema.strip_trailing_slashes",
        "labsite.schema.document_error_responses",
        "labsite.schema.forbid_unknown_fields",
    ],
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "experiments.choices.RunStatus",
        "PlanStatusEnum": "experiments.choices.PlanStatus",
        "AlertStatusEnum": "experiments.choices.AlertStatus",
        "HostKindEnum": "clusters.choices.HostKind",
        "SweepKindEnum": "experiments.choices.SweepKind",
    },
}

# Celery: Redis is the broker; tasks take ids and are idempotent.
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's Django fixup closes the database connections around every task unless this is set,
# and then every 2x this many tasks: labsite.celery applies CONN_MAX_AGE around tasks instead.
CELERY_DB_REUSE_MAX = 2**62
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
# A broker outage must not hang a web request: publish fails fast, the periodic passes catch up.
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}

# Lab policy (lab-wide defaults; hosts may override the GPU thresholds).
LABSITE: dict[str, Any] = {
    "GPU_FREE_MAX_MEM_MB": env_int("LABSITE_GPU_FREE_MAX_MEM_MB", 1024, minimum=0),
    "GPU_FREE_MAX_UTIL_PCT": env_int("LABSITE_GPU_FREE_MAX_UTIL_PCT", 20, minimum=0),
    "MAX_GPUS_PER_USER": env_int("LABSITE_MAX_GPUS_PER_USER", 0, minimum=0),
    "REQUIRE_PLAN_FOR_GPU_WORK": env_bool("LABSITE_REQUIRE_PLAN_FOR_GPU_WORK", False),
    "MAX_QUEUED_RUNS": env_int("LABSITE_MAX_QUEUED_RUNS", 64, minimum=0),
    # How old (seconds) a web process's answer to /api/wild/v2/system-health may be; 0: none.
    "HEALTH_CACHE_SECONDS": env_float("LABSITE_HEALTH_CACHE_SECONDS", 1.0, minimum=0),
    "LOCAL_HOST_ENABLED": env_bool("LABSITE_LOCAL_HOST_ENABLED", True),
    "STOP_GRACE_SECONDS": env_float("LABSITE_STOP_GRACE_SECONDS", 10.0, minimum=0),
    "INVENTORY_INTERVAL_SECONDS": env_float("LABSITE_INVENTORY_INTERVAL_SECONDS", 30.0, minimum=1),
    "POLL_INTERVAL_SECONDS": env_float("LABSITE_POLL_INTERVAL_SECONDS", 2.0, minimum=0.1),
    "SCHEDULE_INTERVAL_SECONDS": env_float("LABSITE_SCHEDULE_INTERVAL_SECONDS", 5.0, minimum=0.1),
    "RECONCILE_INTERVAL_SECONDS": env_float("LABSITE_RECONCILE_INTERVAL_SECONDS", 60.0, minimum=1),
    "BACKFILL_SECONDS": env_float("LABSITE_BACKFILL_SECONDS", 900.0, minimum=0),
    "SINFO_TIMEOUT_SECONDS": env_float("LABSITE_SINFO_TIMEOUT_SECONDS", 5.0, minimum=0.1),
    # Submissions per Slurm cluster: a token bucket, as clusters limit each user's RPCs
    # (slurm.conf's rl_bucket_size, rl_refill_rate); a burst beyond it waits, never trips it.
    # A submission is one RPC (sbatch), a poll three (squeue: partitions, federation, jobs)
    # every LABSITE_SLURM_POLL_SECONDS or more, a detection three more each inventory refresh:
    # 1 a second with 20 at once fits Slurm's own defaults (2 a second, a bucket of 30) with
    # the poll at its default 5 s (measured: make bench, slurm.md; 1.2 a second went over).
    "SLURM_SUBMITS_PER_SECOND": env_float("LABSITE_SLURM_SUBMITS_PER_SECOND", 1.0, minimum=0.01),
    "SLURM_SUBMIT_BURST": env_int("LABSITE_SLURM_SUBMIT_BURST", 20, minimum=1),
    # A Slurm cluster's poll: this often (the floor: never more often than 2 s), doubling while
    # nothing changes up to the max, back to the floor when something does.
    "SLURM_POLL_SECONDS": env_float("LABSITE_SLURM_POLL_SECONDS", 5.0, minimum=2.0),
    "SLURM_POLL_MAX_SECONDS": env_float("LABSITE_SLURM_POLL_MAX_SECONDS", 60.0, minimum=2.0),
    # The local host: runs execute as this unprivileged Unix user (created by `make up` as root);
    # where it cannot be had, only admins' runs go there unless members are trusted explicitly.
    "LOCAL_RUN_USER": env_str("LABSITE_LOCAL_RUN_USER", "labsite-run"),
    "LOCAL_TRUST_MEMBERS": env_bool("LABSITE_LOCAL_TRUST_MEMBERS", False),
    # A PI approving their own plan is recorded as a self-approval; a lab may forbid it.
    "PI_SELF_APPROVAL": env_bool("LABSITE_PI_SELF_APPROVAL", True),
    # Limits on what one request may ask (past one: a 400 naming the limit).
    "MAX_GRID_POINTS": env_int("LABSITE_MAX_GRID_POINTS", 1000, minimum=1),
    "MAX_RUNS_PER_REQUEST": env_int("LABSITE_MAX_RUNS_PER_REQUEST", 1000, minimum=1),
    "MAX_COMMAND_LENGTH": env_int("LABSITE_MAX_COMMAND_LENGTH", 32768, minimum=1),
    "MAX_NAME_LENGTH": env_int("LABSITE_MAX_NAME_LENGTH", 200, minimum=1),
    "MAX_ENV_VARS": env_int("LABSITE_MAX_ENV_VARS", 200, minimum=0),
    "MAX_ENV_BYTES": env_int("LABSITE_MAX_ENV_BYTES", 65536, minimum=0),
    # A run's params, and a sweep's grid, as JSON: list pages show them whole.
    "MAX_PARAMS_BYTES": env_int("LABSITE_MAX_PARAMS_BYTES", 16384, minimum=2),
    "MAX_JSON_DEPTH": env_int("LABSITE_MAX_JSON_DEPTH", 32, minimum=2),
    "MAX_BODY_BYTES": env_int("LABSITE_MAX_BODY_BYTES", 2 * 2**20, minimum=1024),
    # List endpoints show at most this much of a command (the run's own page shows all of it).
    "LIST_COMMAND_CHARS": env_int("LABSITE_LIST_COMMAND_CHARS", 500, minimum=1),
    # Failed sign-ins and bad tokens per client address per minute before a 429.
    "AUTH_FAILURES_PER_MINUTE": env_int("LABSITE_AUTH_FAILURES_PER_MINUTE", 20, minimum=1),
}
DATA_UPLOAD_MAX_MEMORY_SIZE = LABSITE["MAX_BODY_BYTES"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
