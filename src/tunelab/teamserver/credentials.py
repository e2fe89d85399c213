"""The team server's secrets on disk, never on a command line: files only this user reads
(0600, in a 0700 `secrets/` directory), new passwords, and MLflow's login (`--auth`)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tunelab.errors import ServerError

SECRETS = "secrets"  # under the state directory: 0700, every file in it 0600
PGPASS = "pgpass"
LOGIN_FILE = "mlflow-login.env"  # with --auth: MLflow's admin login, for clients
AUTH_ADMIN = "admin"


def write_secret(path: Path, text: str) -> None:
    """`text` into `path`, readable by this user alone (0600) from the moment it exists (written
    beside it and renamed into place); a directory made for it is closed to others (0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_password() -> str:
    return secrets.token_urlsafe(32)  # [A-Za-z0-9_-]: nothing a pgpass or ini line escapes


def prepare_login(state: Path) -> dict[str, str]:
    """MLflow's basic-auth app (`--auth`): its admin's login generated once into
    secrets/mlflow-login.env for clients, its config (secrets/basic_auth.ini: the users'
    database, secrets/basic_auth.db, and the admin's first password) and CSRF key; returns the
    environment `mlflow server --app-name basic-auth` reads them from."""
    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:
        raise ServerError(
            "tunelab server --auth needs MLflow's auth extra (Flask-WTF): pip install "
            "'mlflow[auth]' (or 'tunelab[server]'), or start without --auth"
        )
    folder = state / SECRETS
    login, users = folder / LOGIN_FILE, folder / "basic_auth.db"
    found = _read_login(login)
    if found is None:
        if users.exists():
            raise ServerError(
                f"{login}, MLflow's admin login for this server, is missing, but its users are "
                f"kept in {users}: restore the file, or delete {users} to make a new admin"
            )
        found = (AUTH_ADMIN, new_password())
        write_secret(
            login,
            "# tunelab server --auth: MLflow's admin login. In a shell: `. THIS_FILE`, then\n"
            "# tunelab train tracking.uri=http://127.0.0.1:PORT (MLflow's clients read these)\n"
            f"export MLFLOW_TRACKING_USERNAME={found[0]}\n"
            f"export MLFLOW_TRACKING_PASSWORD={found[1]}\n",
        )
    user, password = found
    if not users.exists():  # sqlite takes an empty file for a new database: made 0600 here
        os.close(os.open(users, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    # The admin's password is read from here only while the admin does not exist yet.
    write_secret(
        folder / "basic_auth.ini",
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{users}\n"
        f"admin_username = {user}\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    key = folder / "flask.key"
    if not key.is_file():
        write_secret(key, new_password() + "\n")
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": key.read_text().strip(),
    }


def auth_was_on(state: Path) -> bool:
    """Whether this state directory was started with MLflow's login before."""
    return (state / SECRETS / "basic_auth.ini").is_file()


def login_file(state: Path) -> Path:
    return state / SECRETS / LOGIN_FILE


def _read_login(file: Path) -> tuple[str, str] | None:
    values = {}
    try:
        for line in file.read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            values[name.strip()] = value.strip()
    except OSError:
        return None
    user, password = values.get("MLFLOW_TRACKING_USERNAME"), values.get("MLFLOW_TRACKING_PASSWORD")
    return (user, password) if user and password else None
