"""Credentials for the servers a study shares: URLs shown without their passwords, and the one line
that says which credentials to set when a server refuses them.

Imports neither MLflow nor PyTorch: `zoo classify` and the CLI's error handler use it too.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

TRACKING_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or the [mlflow] section of "
                        "~/.mlflow/credentials)")


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``postgresql://zoo:***@db/optuna``): for every
    message, param, tag and log line that names a server."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL (a bad port, ...): show none of it past the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else url
    if not password:
        return url
    user_info, _, host = parts.netloc.rpartition("@")
    user = user_info.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def tracking_refused(server: str, status: int, username: str | None) -> str:
    """The one line for a tracking server that answered 401 (who are you?) or 403 (not allowed)."""
    if status == 403:
        return (f"the MLflow tracking server at {server} refused user {username!r} (403: permission denied): ask its "
                "admin for EDIT on the experiment (and on the registered model when registering), or log in as "
                f"another user with {TRACKING_CREDENTIALS}")
    if not username:
        return (f"the MLflow tracking server at {server} asks for a login (401) and none is set: set "
                f"{TRACKING_CREDENTIALS}")
    return (f"the MLflow tracking server at {server} refused the login of user {username!r} (401: wrong user name or "
            f"password): fix {TRACKING_CREDENTIALS}")


def storage_refused_hint(reason: str) -> str | None:
    """What to set when a database refused a login (psycopg's reason), or None for other failures."""
    if "password" not in reason.lower():
        return None
    return ("give the database password in PGPASSWORD or ~/.pgpass (mode 0600, one line "
            "HOST:PORT:DATABASE:USER:PASSWORD), not in the URL")
