"""Settings of the deployer example. Everything site-specific comes from the
environment:

- HOBOTNICA_URL: the controller's REST base URL (default http://127.0.0.1:8080).
- HOBOTNICA_TOKEN: the admin token, or a GitHub token.
- HOBOTNICA_GITHUB_USERNAME: set it when HOBOTNICA_TOKEN is a GitHub token; it
  is sent as X-GitHub-Username.
- DJANGO_SECRET_KEY, DJANGO_DEBUG, DJANGO_ALLOWED_HOSTS, DJANGO_DB_PATH, and
  DJANGO_LOG_LEVEL (of what reaches the console; default INFO: who deployed
  what).

Django hides settings whose names contain TOKEN or KEY from its error pages.
"""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

HOBOTNICA_URL = os.environ.get("HOBOTNICA_URL", "http://127.0.0.1:8080")
HOBOTNICA_TOKEN = os.environ.get("HOBOTNICA_TOKEN", "")
HOBOTNICA_GITHUB_USERNAME = os.environ.get("HOBOTNICA_GITHUB_USERNAME", "")
# Seconds to wait for one answer from the controller.
HOBOTNICA_TIMEOUT = float(os.environ.get("HOBOTNICA_TIMEOUT", "10"))

DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
# Only for trying the example locally: set DJANGO_SECRET_KEY anywhere else.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-example-key-set-DJANGO_SECRET_KEY")
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "deploys",
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

ROOT_URLCONF = "deployer_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB_PATH", BASE_DIR / "db.sqlite3"),
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {
        "console": {"class": "logging.StreamHandler", "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
    },
    "loggers": {"deploys": {"handlers": ["console"], "level": "INFO"}},
}
