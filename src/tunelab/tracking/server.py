"""A team tracking server on this machine: MLflow's runs in a real PostgreSQL, artifacts proxied
by `mlflow server` (clients upload and download through it: `mlflow-artifacts:` URIs), both on
127.0.0.1, everything under one state directory:

    <dir>/pgdata/          the PostgreSQL cluster: created once (initdb), reused on every start
    <dir>/artifacts/       what the server stores for its clients (--artifacts-destination)
    <dir>/postgresql.log   <dir>/mlflow.log
    <dir>/server.json      the ports and processes of the last start (the port is kept)
    <dir>/server.lock      held by the process that runs the server
    <dir>/secrets/         0700, each file 0600, generated at the first start, never on a
                           command line: `pgpass` (libpq's password file: the superuser's and
                           the `mlflow` role's passwords); with --auth, MLflow's login:
                           `mlflow-login.env` (the admin's MLFLOW_TRACKING_USERNAME/PASSWORD),
                           `basic_auth.ini` and `basic_auth.db` (MLflow's users), `flask.key`

Every connection to PostgreSQL needs a password (scram-sha-256; pg_hba.conf has no `trust`
line). MLflow connects as `mlflow`, a role without superuser rights that owns the `mlflow`
database: SQL reaching the database through MLflow cannot run programs (`COPY ... TO PROGRAM`
needs a superuser). A cluster made by an earlier tunelab with trust authentication is migrated
at its next start (passwords set, pg_hba.conf rewritten, the database handed to `mlflow`).

`tunelab server` (`make server`) runs it in the foreground; Ctrl-C or SIGTERM stops MLflow, then
PostgreSQL (`pg_ctl stop -m fast`). PostgreSQL refuses to run as root: as root its commands run
as the `postgres` user, which then owns `pgdata/`. Only the standard library is imported at the
top; psycopg, psutil and mlflow's server are used inside functions.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab import files, locks
from tunelab.errors import ServerError, first_line

DEFAULT_DIR = ".tunelab-server"
PG_USER = "postgres"  # the cluster's superuser, and the OS user it runs as under root
DATABASE = "mlflow"
MLFLOW_ROLE = "mlflow"  # what MLflow connects as: owns DATABASE, no superuser rights
INSTALL_HINT = "install them with `apt-get install -y postgresql`"
# Written into a new cluster's postgresql.conf: TCP on loopback only, no unix socket (its path
# would be limited to 107 bytes, and the system's socket directory may not be writable).
PG_CONF = "\n# tunelab server\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
# The cluster's pg_hba.conf: a password for every connection, whoever makes it.
PG_HBA = """\
# tunelab server: every connection needs a password (scram-sha-256); PostgreSQL listens on
# 127.0.0.1 only. The passwords are in ../secrets/pgpass (0600).
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
"""
SECRETS = "secrets"  # under the state directory: 0700, every file in it 0600
PGPASS = "pgpass"
LOGIN_FILE = "mlflow-login.env"  # with --auth: MLflow's admin login, for clients
AUTH_ADMIN = "admin"


@dataclass
class Binaries:
    """PostgreSQL's server programs (initdb, pg_ctl, postgres) and their major version."""

    bin_dir: Path
    version: str

    def cmd(self, name: str, *args: str) -> list[str]:
        """The command line running `name`: as the postgres user when we are root."""
        program = [str(self.bin_dir / name), *args]
        return ["runuser", "-u", PG_USER, "--", *program] if os.geteuid() == 0 else program


def find_binaries(bin_dir: str | Path | None = None) -> Binaries:
    """PostgreSQL's binaries from `bin_dir`, else $TUNELAB_PG_BIN, else PATH, else the newest
    /usr/lib/postgresql/<version>/bin (where Debian keeps them, off PATH)."""
    given = bin_dir or os.environ.get("TUNELAB_PG_BIN")
    if given:
        candidates = [Path(given)]
    else:
        on_path = shutil.which("initdb")
        debian = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0],
            reverse=True,
        )
        candidates = [Path(on_path).resolve().parent] if on_path else []
        candidates += debian
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            out = subprocess.run(
                [str(folder / "pg_ctl"), "--version"], capture_output=True, text=True
            ).stdout
            found = re.search(r"(\d+)(?:\.\d+)?", out)
            return Binaries(folder, found.group(1) if found else "?")
    where = str(given) if given else "PATH and /usr/lib/postgresql/*/bin"
    raise ServerError(
        f"PostgreSQL's initdb, pg_ctl and postgres are not found in {where}: {INSTALL_HINT}, "
        "or set TUNELAB_PG_BIN to the directory that holds them"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` (connections of a server that just
    stopped, in TIME_WAIT, do not count: servers bind with SO_REUSEADDR, as here)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
    import secrets

    return secrets.token_urlsafe(32)  # [A-Za-z0-9_-]: nothing a pgpass or ini line escapes


@dataclass
class Passwords:
    """The cluster's two passwords, in libpq's password file `file` (`PGPASSFILE=FILE psql -h
    127.0.0.1 -p PORT -U postgres` for an administrator): the superuser's, and the `mlflow`
    role's, which MLflow's server connects as (libpq reads it there: no password in a URI, an
    environment variable or a command line)."""

    file: Path
    superuser: str
    mlflow: str

    @classmethod
    def read(cls, file: Path) -> Passwords | None:
        found: dict[str, str] = {}
        try:
            for line in file.read_text().splitlines():
                fields = line.split(":")
                if len(fields) == 5 and not line.startswith("#"):
                    found[fields[3]] = fields[4]
        except OSError:
            return None
        if PG_USER not in found or MLFLOW_ROLE not in found:
            return None
        return cls(file, found[PG_USER], found[MLFLOW_ROLE])

    @classmethod
    def kept_or_new(cls, file: Path) -> Passwords:
        """The passwords in `file`, or new ones written there first."""
        kept = cls.read(file)
        if kept is not None:
            return kept
        made = cls(file, new_password(), new_password())
        write_secret(
            file,
            "# tunelab server: PostgreSQL's passwords (libpq password file; keep it 0600)\n"
            f"127.0.0.1:*:*:{PG_USER}:{made.superuser}\n"
            f"127.0.0.1:*:*:{MLFLOW_ROLE}:{made.mlflow}\n",
        )
        return made


@dataclass
class Database:
    """One PostgreSQL cluster in `pgdata`, served on 127.0.0.1:`port`, every connection with a
    password from `passfile`."""

    bins: Binaries
    pgdata: Path
    log: Path
    port: int = 0
    passfile: Path | None = None
    passwords: Passwords | None = field(default=None, repr=False)
    migrated: bool = False  # this start moved a trust-authentication cluster to passwords

    def __post_init__(self) -> None:
        if self.passfile is None:
            self.passfile = self.pgdata.parent / SECRETS / PGPASS

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI MLflow's server stores its runs in (psycopg 3 driver): no password
        in it; libpq finds the role's in PGPASSFILE."""
        return f"postgresql+psycopg://{MLFLOW_ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def create(self) -> None:
        """initdb with password authentication, unless `pgdata` already holds a cluster of this
        major version; either way the passwords are known afterwards (generated for a new
        cluster, or one still on trust authentication, which ensure_database migrates)."""
        assert self.passfile is not None
        version_file = self.pgdata / "PG_VERSION"
        if version_file.is_file():
            made_by = version_file.read_text().strip()
            if made_by != self.bins.version:
                raise ServerError(
                    f"{self.pgdata} holds a PostgreSQL {made_by} cluster but these binaries are "
                    f"version {self.bins.version} ({self.bins.bin_dir}): use a new --dir, or "
                    f"point TUNELAB_PG_BIN at PostgreSQL {made_by}'s binaries"
                )
            if self.trusts():
                self.passwords = Passwords.kept_or_new(self.passfile)
                return
            self.passwords = Passwords.read(self.passfile)
            if self.passwords is None:
                raise ServerError(
                    f"the PostgreSQL cluster in {self.pgdata} needs passwords, and "
                    f"{self.passfile} (which holds them) is missing or incomplete: restore it, "
                    "or delete the directory to start from an empty store"
                )
            return
        self.passwords = Passwords.kept_or_new(self.passfile)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)  # initdb insists
        self._own(self.pgdata)
        if os.geteuid() == 0 and _run(
            ["runuser", "-u", PG_USER, "--", "test", "-w", str(self.pgdata)]
        ):
            raise ServerError(
                f"PostgreSQL runs as user {PG_USER!r} (it refuses root), and that user cannot "
                f"reach {self.pgdata}: a directory above it is closed to other users. Choose a "
                "--dir it can reach, e.g. --dir /var/tmp/tunelab-server"
            )
        # The superuser's password reaches initdb in a file only its user can read, removed
        # at once: never on a command line.
        pwfile = self.pgdata.parent / ".initdb-password"
        write_secret(pwfile, self.passwords.superuser + "\n")
        self._own(pwfile)
        args = ["-D", str(self.pgdata), "-U", PG_USER, "--auth=scram-sha-256",
                f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"]  # fmt: skip
        try:
            failed = _run(self.bins.cmd("initdb", *args), cwd=self.pgdata)
        finally:
            pwfile.unlink(missing_ok=True)
        if failed:
            raise ServerError(f"initdb {self.pgdata} failed: {failed}")
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(PG_CONF)
        self._write_hba()

    def trusts(self) -> bool:
        """Whether pg_hba.conf lets any connection in without a password (`trust`: how tunelab
        made clusters before it set passwords)."""
        try:
            lines = (self.pgdata / "pg_hba.conf").read_text().splitlines()
        except OSError:
            return False
        return any("trust" in ln.split("#", 1)[0].split() for ln in lines)

    def _write_hba(self) -> None:
        hba = self.pgdata / "pg_hba.conf"
        tmp = hba.with_name(".pg_hba.conf.tunelab")
        tmp.write_text(PG_HBA)
        tmp.chmod(0o600)
        self._own(tmp)
        os.replace(tmp, hba)

    def start(self) -> None:
        """Start the cluster on `port` (a free one when 0), after clearing what a killed
        PostgreSQL left behind; returns once it accepts connections."""
        self.clear_leftovers()
        self.port = self.port or free_port()
        if not self.log.exists():
            self.log.touch()
        self._own(self.log)
        start_at = self.log.stat().st_size
        args = ["-D", str(self.pgdata), "-l", str(self.log), "-o", f"-p {self.port}"]
        failed = _run(self.bins.cmd("pg_ctl", *args, "-w", "-t", "60", "start"), cwd=self.pgdata)
        if failed:
            raise ServerError(
                f"PostgreSQL did not start: {_last_error(self.log, start_at) or failed}"
            )

    def ensure_database(self) -> None:
        """A cluster still on trust authentication gets its superuser's password and our
        pg_hba.conf first; then, with the password: the `mlflow` role (its password the one in
        the file), and the `mlflow` database owned by it (MLflow's server creates its tables
        there), with what an earlier superuser-owned database holds handed over to it."""
        import psycopg

        assert self.passwords is not None
        try:
            if self.trusts():
                self._set_passwords_of_a_trusting_cluster()
            with self.connect("postgres") as conn:
                verifier = _verifier(conn, MLFLOW_ROLE, self.passwords.mlflow)
                found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (MLFLOW_ROLE,))
                make = "ALTER" if found.fetchone() else "CREATE"
                conn.execute(
                    _sql(make + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}",
                         _id(MLFLOW_ROLE), _literal(verifier))
                )  # fmt: skip
                row = conn.execute(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                    (DATABASE,),
                ).fetchone()
                if row is None:
                    conn.execute(_sql("CREATE DATABASE {} OWNER {}", _id(DATABASE),
                                      _id(MLFLOW_ROLE)))  # fmt: skip
                elif row[0] != MLFLOW_ROLE:
                    conn.execute(_sql("ALTER DATABASE {} OWNER TO {}", _id(DATABASE),
                                      _id(MLFLOW_ROLE)))  # fmt: skip
                    self.migrated = True
                    with self.connect(DATABASE) as in_db:
                        _hand_over(in_db, MLFLOW_ROLE)
        except psycopg.Error as exc:
            first = first_line(exc)
            raise ServerError(f"cannot prepare the {DATABASE!r} database: {first}") from None

    def connect(self, dbname: str, password: bool = True) -> Any:
        """A connection as the superuser, its password read from `passfile` by libpq."""
        import psycopg

        # Without `password`: a password file that does not exist (not ~/.pgpass, nor
        # $PGPASSFILE), so libpq has no password to offer.
        passfile = self.passfile if password else self.pgdata.parent / ".no-password"
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, dbname=dbname, autocommit=True,
            connect_timeout=10, passfile=str(passfile),
        )  # fmt: skip

    def _set_passwords_of_a_trusting_cluster(self) -> None:
        """Migrate a cluster made with trust authentication: the superuser's password set
        (sent as a SCRAM verifier, never in clear), pg_hba.conf rewritten, the server told to
        reload it; returns once a connection without a password is refused."""
        import psycopg

        assert self.passwords is not None
        with self.connect("postgres", password=False) as conn:
            verifier = _verifier(conn, PG_USER, self.passwords.superuser)
            conn.execute(_sql("ALTER ROLE {} PASSWORD {}", _id(PG_USER), _literal(verifier)))
        self._write_hba()
        failed = _run(self.bins.cmd("pg_ctl", "-D", str(self.pgdata), "reload"))
        if failed:
            raise ServerError(f"PostgreSQL did not reload its pg_hba.conf: {failed}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.connect("postgres", password=False).close()
            except psycopg.OperationalError:
                self.migrated = True
                return
            time.sleep(0.2)
        raise ServerError(
            f"PostgreSQL in {self.pgdata} still lets connections in without a password after "
            "its pg_hba.conf was rewritten; see its log"
        )

    def pid(self) -> int | None:
        """The pid of this cluster's running postmaster, or None when it is not running: the
        pid in postmaster.pid counts only if that process is a postgres working in `pgdata`
        (a pid reused by another process after a crash is not taken for it)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if pid in self._processes() else None

    def stop(self, mode: str = "fast") -> None:
        if self.pid() is not None:
            _run(self.bins.cmd("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop"))

    def clear_leftovers(self) -> None:
        """A postmaster still running from an earlier start (its supervisor was killed) is
        stopped; a postmaster.pid whose process is gone (kill -9, power cut) is removed, once
        no process of the old cluster is left."""
        if self.pid() is not None:
            self.stop()
        deadline = time.monotonic() + 15
        while self._processes() and time.monotonic() < deadline:
            time.sleep(0.2)  # a killed postmaster's backends notice and exit
        left = self._processes()
        if left:
            raise ServerError(
                f"processes of the old PostgreSQL in {self.pgdata} are still running "
                f"(pids {', '.join(map(str, sorted(left)))}); stop them and start again"
            )
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)

    def _processes(self) -> set[int]:
        """Pids of the processes working in `pgdata` (postgres changes into its data dir)."""
        import psutil

        found = set()
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "postgres" and Path(proc.cwd()) == self.pgdata:
                    found.add(proc.pid)
            except (psutil.Error, OSError):
                continue
        return found

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, PG_USER, PG_USER)


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


@dataclass
class Server:
    """A started team server: PostgreSQL, and `mlflow server` in a process group of its own."""

    state_dir: Path
    database: Database
    port: int
    proc: subprocess.Popen[bytes]
    lock: locks.Lock
    login: Path | None = None  # with --auth: the file holding MLflow's admin login
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """MLflow first (no request half-done against a stopping database), then PostgreSQL."""
        if self._stopped:
            return
        self._stopped = True
        try:
            _stop_group(self.proc.pid)
            self.proc.wait()
            self.database.stop("fast")
            with contextlib.suppress(OSError):  # a full disk: server.json keeps the same port
                _write_state(self.state_dir, {"port": self.port})
        finally:
            _release(self.lock)


def start(
    state_dir: str | Path = DEFAULT_DIR,
    port: int | None = None,
    workers: int = 2,
    bin_dir: str | Path | None = None,
    timeout: float = 180,
    auth: bool | None = None,
) -> Server:
    """Start PostgreSQL and `mlflow server` on it, both on 127.0.0.1, state in `state_dir`;
    return once the server answers /health. `port`: the server's port (default: the one this
    directory used last, when free, else a free one). `auth`: MLflow's login on (True) or off
    (False); None: on when this directory was started with it before."""
    bins = find_binaries(bin_dir)
    _require_driver()
    _require_pg_user()
    state = Path(state_dir).expanduser().resolve()
    made = not state.exists()
    state.mkdir(parents=True, exist_ok=True)
    lock = _lock(state)
    database = Database(bins, state / "pgdata", state / "postgresql.log")
    proc = None
    try:
        _stop_leftover_mlflow(state)
        port = _choose_port(port, _read_state(state).get("port"))
        if auth is None:
            auth = (state / SECRETS / "basic_auth.ini").is_file()
        login_env = prepare_login(state) if auth else {}
        database.create()
        database.start()
        database.ensure_database()
        (state / "artifacts").mkdir(exist_ok=True)
        assert database.passfile is not None
        proc = _start_mlflow(state, database, port, workers, login_env)
        login = state / SECRETS / LOGIN_FILE if auth else None
        server = Server(state, database, port, proc, lock, login)
        _write_state(state, {"port": port, "pid": os.getpid(), "mlflow_pid": proc.pid,
                             "postgres_port": database.port, "url": server.url,
                             "auth": bool(auth)})  # fmt: skip
        _wait_healthy(server, timeout)
        return server
    except BaseException:
        if proc is not None:
            _stop_group(proc.pid)
            proc.wait()
        database.stop("fast")
        _release(lock)
        if made and not any(state.iterdir()):  # refused before anything was made in it
            state.rmdir()
        raise


def _release(lock: locks.Lock) -> None:
    """Let go of the state directory's lock, and remove its file while still holding it (safe
    then: locks.Lock), so a stopped or refused server leaves no lock file behind."""
    lock.path.unlink(missing_ok=True)
    lock.release()


def serve(
    state_dir: str | Path = DEFAULT_DIR,
    port: int | None = None,
    workers: int = 2,
    auth: bool | None = None,
) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM (exit status 0), or until
    MLflow or PostgreSQL stops by itself (1)."""

    def stop_on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        server = start(state_dir, port, workers, auth=auth)
    except KeyboardInterrupt:  # start() stopped what it had started
        signal.signal(signal.SIGTERM, previous)
        print("tunelab server: interrupted while starting; stopped", file=sys.stderr)
        return 130
    state = server.state_dir
    print(
        f"tunelab server: MLflow at {server.url} on PostgreSQL {server.database.bins.version} "
        f"(127.0.0.1:{server.database.port}), artifacts proxied into {state / 'artifacts'}\n"
        f"  tunelab train tracking.uri={server.url}      "
        f"(or export MLFLOW_TRACKING_URI={server.url})\n"
        f"  logs: {state / 'mlflow.log'}, {state / 'postgresql.log'}; Ctrl-C stops both\n"
        f"  PostgreSQL's passwords: {server.database.passfile} (0600; MLflow connects as "
        f"{MLFLOW_ROLE!r}, not as a superuser)\n"
        + (
            f"  MLflow login on: {server.login} (0600) holds the admin's "
            f"MLFLOW_TRACKING_USERNAME/PASSWORD; `. {server.login}` before tunelab train/runs"
            if server.login
            else "  MLflow login off: any local user can read and write runs through the port "
            "(--auth turns MLflow's login on)"
        ),
        flush=True,
    )
    if server.database.migrated:
        print(
            f"tunelab server: {server.database.pgdata} trusted every local connection; it now "
            f"needs a password (in {server.database.passfile}), and MLflow's database belongs "
            f"to the role {MLFLOW_ROLE!r}",
            flush=True,
        )
    why = None
    try:
        while why is None:
            time.sleep(1)
            if server.proc.poll() is not None:
                last = _last_error(state / "mlflow.log")
                why = (
                    f"the MLflow server exited ({server.proc.returncode}): {last or 'see the log'}"
                )
            elif server.database.pid() is None:
                last = _last_error(server.database.log)
                why = f"PostgreSQL stopped: {last or 'see the log'}; stopping MLflow too"
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or SIGTERM must not cut the stop short (PostgreSQL left running).
        before_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            server.stop()
        finally:
            signal.signal(signal.SIGINT, before_int)
            signal.signal(signal.SIGTERM, previous)
    if why:
        print(f"tunelab server: {why}. `make server` starts both again.", file=sys.stderr)
        return 1
    print("tunelab server: stopped", flush=True)
    return 0


def main(args: list[str]) -> None:
    """`tunelab server [--dir DIR] [--port N] [--workers N] [--auth | --no-auth]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="tunelab server",
        description="An MLflow tracking server on PostgreSQL, with proxied artifacts, on "
        "127.0.0.1, in the foreground (Ctrl-C stops it). Point runs at it with "
        "tracking.uri=http://127.0.0.1:PORT.",
    )
    parser.add_argument(
        "--dir", default=DEFAULT_DIR, help=f"state directory (default: ./{DEFAULT_DIR})"
    )
    port_help = "the server's port (default: the one DIR used last, else a free one)"
    parser.add_argument("--port", type=int, default=None, help=port_help)
    parser.add_argument("--workers", type=int, default=2, help="MLflow server workers (default 2)")
    parser.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"MLflow's login (basic-auth app): credentials generated into "
        f"DIR/{SECRETS}/{LOGIN_FILE}; clients set MLFLOW_TRACKING_USERNAME/PASSWORD from it. "
        "A DIR started with --auth keeps it on later starts; --no-auth: this start without",
    )
    opts = parser.parse_args(args)
    if opts.port is not None and not 1 <= opts.port <= 65535:
        parser.error(f"argument --port: {opts.port} is not a port (1 to 65535)")
    if opts.workers < 1:
        parser.error(f"argument --workers: {opts.workers} must be at least 1")
    raise SystemExit(serve(opts.dir, opts.port, opts.workers, opts.auth))


# ---------------------------------------------------------------------------------------------


def _sql(template: str, *parts: Any) -> Any:
    from psycopg import sql

    return sql.SQL(template).format(*parts)


def _id(name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(name)


def _literal(value: str) -> Any:
    from psycopg import sql

    return sql.Literal(value)


def _verifier(conn: Any, role: str, password: str) -> str:
    """`password` as the SCRAM verifier PostgreSQL stores: what ALTER ROLE is sent, so the
    password itself never reaches the server, nor its log."""
    method = b"scram-sha-256"
    return bytes(conn.pgconn.encrypt_password(password.encode(), role.encode(), method)).decode()


def _hand_over(conn: Any, role: str) -> None:
    """Everything in this database that its former owner created (MLflow's tables, their
    sequences and types) to `role`, its new owner: MLflow's schema migrations alter them."""
    system = ("n.nspname NOT IN ('pg_catalog', 'information_schema') "
              "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'")  # fmt: skip
    owner = "(SELECT oid FROM pg_roles WHERE rolname = %s)"
    queries = [
        ("TABLE", f"SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON "
                  f"n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND "
                  f"{system} AND c.relowner <> {owner}"),
        # Sequences a table owns (serial columns) went with it; the others now.
        ("SEQUENCE", f"SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON "
                     f"n.oid = c.relnamespace WHERE c.relkind = 'S' AND {system} AND "
                     f"c.relowner <> {owner}"),
        ("TYPE", f"SELECT n.nspname, t.typname FROM pg_type t JOIN pg_namespace n ON "
                 f"n.oid = t.typnamespace WHERE t.typtype IN ('e', 'd', 'r') AND {system} "
                 f"AND t.typowner <> {owner}"),
    ]  # fmt: skip
    for kind, query in queries:
        for schema, name in conn.execute(query, (role,)).fetchall():
            conn.execute(
                _sql(f"ALTER {kind} {{}}.{{}} OWNER TO {{}}", _id(schema), _id(name), _id(role))
            )


def _require_driver() -> None:
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        raise ServerError(
            "the PostgreSQL driver psycopg is not installed: pip install 'tunelab[server]' "
            "(make install includes it)"
        )


def _require_pg_user() -> None:
    import pwd

    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        raise ServerError(
            f"PostgreSQL refuses to run as root, and there is no {PG_USER!r} user to run it as: "
            f"{INSTALL_HINT} (it creates one), or run as a normal user"
        ) from None


def _lock(state: Path) -> locks.Lock:
    """Hold the state directory's lock, or say where the server that holds it serves."""
    try:
        return locks.Lock(state / "server.lock", f"server directory {state}").acquire()
    except locks.Busy:
        holder = (state / "server.lock").read_text().strip() or "?"
        known = _read_state(state)
        if str(known.get("pid")) != holder:  # server.json is an earlier start's: still starting
            raise ServerError(
                f"a tunelab server is starting from {state} (pid {holder}); wait for it to say "
                "where it serves, or stop it"
            ) from None
        raise ServerError(
            f"a tunelab server already runs from {state} (pid {holder}): use "
            f"tracking.uri={known['url']}, or stop it (Ctrl-C in its terminal, or kill {holder})"
        ) from None


def _choose_port(asked: int | None, last: int | None) -> int:
    """The port asked for (checked free before anything was created), else the one this
    directory used last when it is free (the URL the team wrote down keeps working). Checked
    after the server a killed supervisor left behind is stopped: it may hold that port."""
    if asked:
        if not port_is_free(asked):
            raise ServerError(
                f"port {asked} on 127.0.0.1 is taken; choose another --port, or leave it out "
                "to take a free one"
            )
        return asked
    return last if last and port_is_free(last) else free_port()


def _start_mlflow(
    state: Path, database: Database, port: int, workers: int, login_env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """`mlflow server` on `database`: the store's URI in its environment and the role's
    password in the pgpass file libpq reads (PGPASSFILE), so neither is on a command line that
    `ps` shows; with `login_env`, MLflow's basic-auth app."""
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--artifacts-destination", str(state / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]  # fmt: skip
    if login_env:
        cmd += ["--app-name", "basic-auth"]
    env = {**os.environ, **login_env}
    env["MLFLOW_BACKEND_STORE_URI"] = database.uri
    env["PGPASSFILE"] = str(database.passfile)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME"):
        env.pop(name, None)
    with open(state / "mlflow.log", "ab") as log:
        # A session of its own: stopping it stops uvicorn and its workers too.
        return subprocess.Popen(
            cmd, cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_healthy(server: Server, timeout: float) -> None:
    log = server.state_dir / "mlflow.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerError(
                f"the MLflow server exited ({server.proc.returncode}) while starting: "
                f"{_last_error(log) or f'see {log}'}"
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise ServerError(
        f"the MLflow server did not answer on {server.url} in {timeout:.0f} s: see {log}"
    )


def _stop_leftover_mlflow(state: Path) -> None:
    """The MLflow server of an earlier start whose supervisor was killed (kill -9) still holds
    the port: stop it, so this start can serve on the same port."""
    import psutil

    pid = _read_state(state).get("mlflow_pid")
    if not pid:
        return
    try:
        proc = psutil.Process(pid)
        ours = "mlflow" in " ".join(proc.cmdline()) and os.getpgid(pid) == pid
    except (psutil.Error, OSError):
        return
    if ours:
        _stop_group(pid)


def _stop_group(pgid: int, grace: float = 20) -> None:
    """SIGTERM to a process group, then SIGKILL to what is left after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, ended but not yet reaped by their
    parent, do not count: kill(-pgid, 0) would)."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, OSError):
            continue
    return False


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """Run `cmd`; None when it succeeds, else its last line of output (or why it could not
    start)."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr + proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _last_error(log: Path, offset: int = 0) -> str | None:
    """The last line of `log` (from `offset`) that reports an error, if any."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    marks = ("FATAL", "ERROR", "Error", "error:", "PANIC")
    found = [ln.strip() for ln in lines if any(m in ln for m in marks)]
    return found[-1] if found else None


def _read_state(state: Path) -> dict[str, Any]:
    return files.read_json(state / "server.json")


def _write_state(state: Path, values: dict[str, Any]) -> None:
    files.write_json(state / "server.json", values)
