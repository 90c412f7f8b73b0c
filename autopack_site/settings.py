"""Settings: every value comes from the environment (django-environ); production differs only
by env vars. The defaults are the embedded set-up of `make run`: SQLite and a file-system broker
under `.autopack/`, so nothing needs a server."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

STATE_DIR = Path(env.str("AUTOPACK_STATE_DIR", default=str(BASE_DIR / ".autopack")))
STATE_DIR.mkdir(parents=True, exist_ok=True)


def _dev_secret_key() -> str:
    # Outside production a key is made once per checkout and kept out of git (.autopack/).
    path = STATE_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="") or _dev_secret_key()
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",  # intcomma: numbers a person reads, grouped by thousands
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "axes",
    "usage",
    "routing",
    "runs",
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
    # Last, as django-axes requires: turns a locked-out login into its 429 answer.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    # django-axes first: refuses a login attempt from a locked-out username and address.
    "runs.permissions.LoginLockoutBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "autopack_site.urls"

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
            ],
        },
    },
]

WSGI_APPLICATION = "autopack_site.wsgi.application"
ASGI_APPLICATION = "autopack_site.asgi.application"

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{STATE_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat share one SQLite file: WAL lets readers run beside the writer,
    # IMMEDIATE takes the write lock at BEGIN so two writers queue instead of deadlocking.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("AUTOPACK_TIME_ZONE", default="UTC")
USE_I18N = True
# Times to the second in the admin (autopack_site/formats/en/formats.py).
FORMAT_MODULE_PATH = ["autopack_site.formats"]
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = STATE_DIR / "static"
# Files are served through the finders (below) until `collectstatic` fills this folder; it
# exists from the start so WhiteNoise does not warn on every process start.
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

LOGIN_URL = "/admin/login/"

# Throttle counters (DRF) and cached run statuses live in this cache; production points it at
# Redis so every web process shares them (`redis://host:6379/1`).
CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://")}

# --- security: production turns these on through env (see README, `check --deploy`) ---
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=False)
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
BEHIND_TLS_PROXY = env.bool("DJANGO_BEHIND_TLS_PROXY", default=False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if BEHIND_TLS_PROXY else None

# Failed logins (admin login form and POST /api/token/) are counted per username and client
# address by django-axes; past the limit that pair is refused with 429 until the cool-off ends.
AXES_FAILURE_LIMIT = env.int("AUTOPACK_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("AUTOPACK_LOGIN_COOLOFF_MINUTES", default=15.0))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# django-axes' default, named here so code reading it (runs.permissions.lockout_response) reads
# a setting the project defines.
AXES_HTTP_RESPONSE_CODE = 429
AXES_LOCKOUT_CALLABLE = "runs.permissions.lockout_response"
# The client address: REMOTE_ADDR, or the proxy's X-Forwarded-For entry behind the TLS proxy.
# Without a proxy a client-sent X-Forwarded-For is ignored, so it cannot dodge the count.
AXES_IPWARE_PROXY_COUNT = 1 if BEHIND_TLS_PROXY else None
AXES_IPWARE_META_PRECEDENCE_ORDER = (
    ("HTTP_X_FORWARDED_FOR", "REMOTE_ADDR") if BEHIND_TLS_PROXY else ("REMOTE_ADDR",)
)

REST_FRAMEWORK: dict[str, Any] = {
    # Token first: an anonymous request then gets 401 with WWW-Authenticate: Token (DRF answers
    # with the first authenticator's header); the browser's session still works, with CSRF.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["runs.permissions.IsStaffReader"],
    # Every API call counts against its user's rate; POST /api/token/ against the client
    # address's (runs.permissions.TokenObtainThrottle).
    "DEFAULT_THROTTLE_CLASSES": ["runs.permissions.ApiUserThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "user": env.str("AUTOPACK_API_RATE", default="600/minute"),
        "token": env.str("AUTOPACK_TOKEN_RATE", default="10/minute"),
    },
    # The throttles' client address: 0 = REMOTE_ADDR, ignoring a client-sent X-Forwarded-For.
    "NUM_PROXIES": 1 if BEHIND_TLS_PROXY else 0,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "runs.api_errors.exception_handler",
    # Every JSON body goes through runs.parsers.JSONParser: a 400, never a RecursionError, for
    # a body nested too deeply.
    "DEFAULT_PARSER_CLASSES": [
        "runs.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Autopack control plane API",
    "DESCRIPTION": "Watch and steer Autopack runs: status, controls, model mapping and usage.",
    "VERSION": "1.0.0",
    # Swagger UI's files are served from the drf-spectacular-sidecar package: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SERVE_PERMISSIONS": ["runs.permissions.IsStaffReader"],
    # The schema documents the API, not the schema endpoint itself.
    "SERVE_INCLUDE_SCHEMA": False,
    # Request bodies get components of their own, with the limits a request must keep
    # (e.g. minLength of a required text), apart from the answers' components.
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- Celery ---
_BROKER_DIR = STATE_DIR / "broker"
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    # The file transport has no host, but kombu warns "No hostname was supplied" on every
    # connection of a URL that names none (every command that enqueues printed it). Naming
    # localhost gives the same connection (kombu falls back to it) without the warning.
    if CELERY_BROKER_URL.rstrip("/") == "filesystem:":
        CELERY_BROKER_URL = "filesystem://localhost/"
    for sub in ("queue", "processed", "control"):
        (_BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_BROKER_DIR / "queue"),
        "data_folder_out": str(_BROKER_DIR / "queue"),
        "processed_folder": str(_BROKER_DIR / "processed"),
        # kombu's default is ./control, which would litter the working directory.
        "control_folder": str(_BROKER_DIR / "control"),
        "store_processed": False,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # A message a dead worker held comes back after this long; the phase sweeper is
        # faster, and a late duplicate finds its phase already claimed or finished.
        "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600),
    }
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE_FILENAME = str(STATE_DIR / "celerybeat-schedule")

# --- Autopack ---
AUTOPACK_MODELS_FILE = Path(
    env.str("AUTOPACK_MODELS_FILE", default=str(BASE_DIR / "config" / "models.yaml"))
)
# A phase whose worker has not renewed its lease for this long is handed to another worker.
AUTOPACK_PHASE_LEASE_SECONDS = env.float("AUTOPACK_PHASE_LEASE_SECONDS", default=60.0)
# The sweeper hands on phases whose worker is gone and resends lost messages this often.
AUTOPACK_SWEEP_INTERVAL_SECONDS = env.float("AUTOPACK_SWEEP_INTERVAL_SECONDS", default=5.0)
# A worker holding a phase writes its heartbeat this often (runs.holders). A holder on another
# machine whose heartbeat is older than AUTOPACK_WORKER_LOST_AFTER_SECONDS is taken for dead and
# its phase handed on; on the same machine its pid tells at once. Both well under the lease, so
# a killed worker's phase moves on within about 20 s, not the lease's minute.
AUTOPACK_WORKER_HEARTBEAT_SECONDS = env.float("AUTOPACK_WORKER_HEARTBEAT_SECONDS", default=4.0)
AUTOPACK_WORKER_LOST_AFTER_SECONDS = env.float("AUTOPACK_WORKER_LOST_AFTER_SECONDS", default=12.0)
# One provider call may take this long before it is abandoned and retried.
AUTOPACK_PROVIDER_TIMEOUT_SECONDS = env.float("AUTOPACK_PROVIDER_TIMEOUT_SECONDS", default=120.0)
AUTOPACK_PROVIDER_MAX_RETRIES = env.int("AUTOPACK_PROVIDER_MAX_RETRIES", default=4)
AUTOPACK_PROVIDER_BACKOFF_SECONDS = env.float("AUTOPACK_PROVIDER_BACKOFF_SECONDS", default=1.0)
# How long a provider that refused for a spent limit (429, 402, insufficient_quota) without
# saying when it comes back is left alone (docs/providers.md, "Rate limits and cooldowns").
AUTOPACK_COOLDOWN_DEFAULT_SECONDS = env.float("AUTOPACK_COOLDOWN_DEFAULT_SECONDS", default=60.0)
# The most output tokens one call may ask for: a builder writes whole files, so its replies get
# more room than the auditor's verdict and other calls.
AUTOPACK_MAX_OUTPUT_TOKENS = env.int("AUTOPACK_MAX_OUTPUT_TOKENS", default=4096)
AUTOPACK_BUILDER_MAX_OUTPUT_TOKENS = env.int("AUTOPACK_BUILDER_MAX_OUTPUT_TOKENS", default=16384)
AUTOPACK_MAX_PLAN_BYTES = env.int("AUTOPACK_MAX_PLAN_BYTES", default=1_000_000)
AUTOPACK_MAX_PLAN_PHASES = env.int("AUTOPACK_MAX_PLAN_PHASES", default=2_000)
AUTOPACK_WORKSPACE_ROOT = Path(
    env.str("AUTOPACK_WORKSPACE_ROOT", default=str(STATE_DIR / "workspaces"))
)
# Folders that may hold the local git repositories a plan names as `source:` (':' or ','
# between them). Empty: no plan may use a local repository (runs.workspace).
AUTOPACK_SOURCE_ROOTS = env.str("AUTOPACK_SOURCE_ROOTS", default="")
# A builder's change is refused whole when one file's new content is larger than this (bytes)
# or when it touches more files than this (runs.workspace.workspace_apply).
AUTOPACK_MAX_EDIT_BYTES = env.int("AUTOPACK_MAX_EDIT_BYTES", default=1_000_000)
AUTOPACK_MAX_EDIT_FILES = env.int("AUTOPACK_MAX_EDIT_FILES", default=200)
# A plan's checks run model-written code in a bubblewrap sandbox (runs.sandbox), each bounded
# in time, memory and processes. Without bubblewrap they are not run unless a person allows
# running them with the worker's own rights.
AUTOPACK_CHECK_TIMEOUT_SECONDS = env.float("AUTOPACK_CHECK_TIMEOUT_SECONDS", default=300.0)
AUTOPACK_CHECK_MEMORY_MB = env.int("AUTOPACK_CHECK_MEMORY_MB", default=2048)
AUTOPACK_CHECK_MAX_PROCESSES = env.int("AUTOPACK_CHECK_MAX_PROCESSES", default=256)
AUTOPACK_CHECK_BWRAP = env.str("AUTOPACK_CHECK_BWRAP", default="bwrap")
AUTOPACK_ALLOW_UNSANDBOXED_CHECKS = env.bool("AUTOPACK_ALLOW_UNSANDBOXED_CHECKS", default=False)

# Recorded calls are added to the usage rollups in batches this often (usage.models); until
# then summaries read them from the events, so this bounds work, not accuracy.
AUTOPACK_USAGE_FOLD_SECONDS = env.float("AUTOPACK_USAGE_FOLD_SECONDS", default=5.0)
# POST /usage/events (runs.usage_ingest): the most events one batch may hold, the largest body
# (bytes; 5,000 events of a few hundred bytes each fit), and how far ahead of the server's clock
# an event's time may be (clients' clocks drift) before it is refused as in the future.
AUTOPACK_USAGE_BATCH_MAX = env.int("AUTOPACK_USAGE_BATCH_MAX", default=5_000)
AUTOPACK_USAGE_MAX_BODY_BYTES = env.int("AUTOPACK_USAGE_MAX_BODY_BYTES", default=8_000_000)
AUTOPACK_USAGE_FUTURE_SKEW_SECONDS = env.float("AUTOPACK_USAGE_FUTURE_SKEW_SECONDS", default=300.0)
# OTLP/HTTP receiver (POST /v1/logs, /v1/metrics, /v1/traces: runs.otlp_api): the largest body
# in bytes, as sent and again after gzip (so a small compressed body cannot unpack to gigabytes).
AUTOPACK_OTLP_MAX_BODY_BYTES = env.int("AUTOPACK_OTLP_MAX_BODY_BYTES", default=8_000_000)
# The providers' own usage APIs (usage.provider_usage), read when an admin key is set in the
# environment (OPENAI_ADMIN_KEY, ANTHROPIC_ADMIN_KEY; never stored): this often, the last this
# many UTC days (today included) re-read each time. Reconciliation (usage.reconcile) flags a
# day whose metered and reported tokens differ by more than this percentage of the reported;
# with AUTOPACK_CAP_USE_LARGER the cap windows count the reported tokens where they are larger.
AUTOPACK_PROVIDER_USAGE_SECONDS = env.float("AUTOPACK_PROVIDER_USAGE_SECONDS", default=600.0)
AUTOPACK_PROVIDER_USAGE_DAYS = env.int("AUTOPACK_PROVIDER_USAGE_DAYS", default=2)
AUTOPACK_RECONCILE_THRESHOLD_PERCENT = env.float(
    "AUTOPACK_RECONCILE_THRESHOLD_PERCENT", default=2.0
)
AUTOPACK_RECONCILE_DAYS = env.int("AUTOPACK_RECONCILE_DAYS", default=7)
AUTOPACK_CAP_USE_LARGER = env.bool("AUTOPACK_CAP_USE_LARGER", default=False)

CELERY_BEAT_SCHEDULE = {
    "sweep-expired-phase-leases": {
        "task": "runs.tasks.sweep_expired_leases",
        "schedule": AUTOPACK_SWEEP_INTERVAL_SECONDS,
    },
    "fold-usage-into-rollups": {
        "task": "usage.tasks.fold_usage",
        "schedule": AUTOPACK_USAGE_FOLD_SECONDS,
    },
    "fetch-provider-usage": {
        "task": "usage.tasks.fetch_provider_usage",
        "schedule": AUTOPACK_PROVIDER_USAGE_SECONDS,
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("AUTOPACK_LOG_LEVEL", default="INFO")},
    "loggers": {
        # The SDKs' HTTP loggers print request lines; keep them quiet so headers never leak.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        "openai": {"level": "WARNING"},
        "anthropic": {"level": "WARNING"},
        "google_genai": {"level": "WARNING"},
        # django-axes logs its start-up banner ("AXES: BEGIN version …") at INFO from its
        # AppConfig.ready, so every manage.py command printed it on stderr. Only that logger:
        # axes' lockout warnings come from axes.handlers.* and still reach the console.
        "axes.apps": {"level": "WARNING"},
    },
}

# The router re-reads the mapping version at most this often, and the providers' usage against
# their caps at most this often; in between, a decision touches no database.
AUTOPACK_ROUTER_REFRESH_SECONDS = env.float("AUTOPACK_ROUTER_REFRESH_SECONDS", default=2.0)
AUTOPACK_QUOTA_REFRESH_SECONDS = env.float("AUTOPACK_QUOTA_REFRESH_SECONDS", default=5.0)
# GET /dashboard/runs/{id}/status answers from a cache keyed by the run's updated_at, so a state
# or progress change shows at once while token and issue counts may lag by this long; every
# dashboard and API poller then shares one computation instead of six queries each (issue 7).
AUTOPACK_STATUS_CACHE_SECONDS = env.float("AUTOPACK_STATUS_CACHE_SECONDS", default=1.0)
# Celery's Django fix-up closes every database connection before and after each task unless
# this is set (it then closes them every this many tasks): the worker keeps its connections
# as the web does instead, by CONN_MAX_AGE with health checks (autopack_site/celery.py).
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=1_000_000)
