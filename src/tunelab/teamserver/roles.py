"""Who connects to the team server's PostgreSQL, and as whom: the superuser and the `mlflow`
role (no superuser rights; it owns MLflow's database, so SQL reaching the database through
MLflow cannot run programs: `COPY ... TO PROGRAM` needs a superuser), their passwords in libpq's
password file, pg_hba.conf (a password for every connection), and the SQL that sets them.
psycopg is imported inside the functions that use it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.teamserver.credentials import new_password, write_secret

PG_USER = "postgres"  # the cluster's superuser, and the OS user it runs as under root
DATABASE = "mlflow"
MLFLOW_ROLE = "mlflow"  # what MLflow connects as: owns DATABASE, no superuser rights
# The cluster's pg_hba.conf: a password for every connection, whoever makes it.
PG_HBA = """\
# tunelab server: every connection needs a password (scram-sha-256); PostgreSQL listens on
# 127.0.0.1 only. The passwords are in ../secrets/pgpass (0600).
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
"""


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


def set_password(conn: Any, role: str, password: str) -> None:
    """ALTER ROLE with the password's SCRAM verifier (never the password itself)."""
    verifier = _verifier(conn, role, password)
    conn.execute(_sql("ALTER ROLE {} PASSWORD {}", _id(role), _literal(verifier)))


def ensure_mlflow_role(conn: Any, password: str) -> None:
    """The `mlflow` role, created or altered: it logs in with `password`, and is no
    superuser, cannot create databases nor roles."""
    verifier = _verifier(conn, MLFLOW_ROLE, password)
    found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (MLFLOW_ROLE,))
    make = "ALTER" if found.fetchone() else "CREATE"
    conn.execute(
        _sql(make + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}",
             _id(MLFLOW_ROLE), _literal(verifier))
    )  # fmt: skip


def ensure_mlflow_database(conn: Any) -> bool:
    """MLflow's database, created owned by the `mlflow` role, or handed to it; True when it was
    handed over (what the database holds must follow: `hand_over`)."""
    row = conn.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (DATABASE,)
    ).fetchone()
    if row is None:
        conn.execute(_sql("CREATE DATABASE {} OWNER {}", _id(DATABASE), _id(MLFLOW_ROLE)))
        return False
    if row[0] == MLFLOW_ROLE:
        return False
    conn.execute(_sql("ALTER DATABASE {} OWNER TO {}", _id(DATABASE), _id(MLFLOW_ROLE)))
    return True


def hand_over(conn: Any, role: str) -> None:
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


def _verifier(conn: Any, role: str, password: str) -> str:
    """`password` as the SCRAM verifier PostgreSQL stores: what ALTER ROLE is sent, so the
    password itself never reaches the server, nor its log."""
    method = b"scram-sha-256"
    return bytes(conn.pgconn.encrypt_password(password.encode(), role.encode(), method)).decode()


def _sql(template: str, *parts: Any) -> Any:
    from psycopg import sql

    return sql.SQL(template).format(*parts)


def _id(name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(name)


def _literal(value: str) -> Any:
    from psycopg import sql

    return sql.Literal(value)
