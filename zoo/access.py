"""Server URLs shown without passwords, and the one line naming the credentials to set when a server refuses
them. Imports neither MLflow nor PyTorch (the CLI's error handler uses it)."""

import re
from urllib.parse import unquote_plus, urlsplit

TRACKING_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or the [mlflow] section of "
                        "~/.mlflow/credentials)")
# Query parameters that carry a credential; a mere key file's path (sslkey) masked too costs less than a leak.
SECRET_PARAMETER = re.compile(r"password|secret|token|key", re.IGNORECASE)


def masked_url(url: str) -> str:
    """``url`` with the password in its user info and any password/secret/token/key query value as ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL (a bad port, ...): show none of it past the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else url
    # The rest of the URL is kept as written (urlunsplit would turn sqlite:///x into sqlite:/x).
    if password:
        user_info, _, host = parts.netloc.rpartition("@")
        user = user_info.split(":", 1)[0]
        url = url.replace(parts.netloc, f"{user}:***@{host}", 1)
    if parts.query:
        fields = [f"{name}=***" if equals and value and SECRET_PARAMETER.search(unquote_plus(name)) else field
                  for field in parts.query.split("&") for name, equals, value in [field.partition("=")]]
        url = url.replace(f"?{parts.query}", "?" + "&".join(fields), 1)
    return url


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
