"""The team server's PostgreSQL cluster: its binaries found, the cluster created once (initdb,
password authentication), started on 127.0.0.1, MLflow's role and database prepared (roles),
stopped, and what a killed one left behind cleared. A cluster made by an earlier tunelab with
trust authentication is migrated at its next start. PostgreSQL refuses to run as root: as root
its commands run as the `postgres` user, which then owns `pgdata/`. psycopg and psutil are
imported inside the functions that use them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ServerError, first_line
from tunelab.teamserver import roles
from tunelab.teamserver.credentials import PGPASS, SECRETS, write_secret
from tunelab.teamserver.processes import free_port, last_error, run_command
from tunelab.teamserver.roles import DATABASE, MLFLOW_ROLE, PG_USER, Passwords

INSTALL_HINT = "install them with `apt-get install -y postgresql`"
# Written into a new cluster's postgresql.conf: TCP on loopback only, no unix socket (its path
# would be limited to 107 bytes, and the system's socket directory may not be writable).
PG_CONF = "\n# tunelab server\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"


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


def require_driver() -> None:
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        raise ServerError(
            "the PostgreSQL driver psycopg is not installed: pip install 'tunelab[server]' "
            "(make install includes it)"
        )


def require_pg_user() -> None:
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
        if os.geteuid() == 0 and run_command(
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
            failed = run_command(self.bins.cmd("initdb", *args), cwd=self.pgdata)
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
        tmp.write_text(roles.PG_HBA)
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
        failed = run_command(
            self.bins.cmd("pg_ctl", *args, "-w", "-t", "60", "start"), cwd=self.pgdata
        )
        if failed:
            raise ServerError(
                f"PostgreSQL did not start: {last_error(self.log, start_at) or failed}"
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
                roles.ensure_mlflow_role(conn, self.passwords.mlflow)
                if roles.ensure_mlflow_database(conn):
                    self.migrated = True
                    with self.connect(DATABASE) as in_db:
                        roles.hand_over(in_db, MLFLOW_ROLE)
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
            roles.set_password(conn, PG_USER, self.passwords.superuser)
        self._write_hba()
        failed = run_command(self.bins.cmd("pg_ctl", "-D", str(self.pgdata), "reload"))
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
            run_command(self.bins.cmd("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop"))

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
