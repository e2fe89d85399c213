"""A team tracking server on this machine (`tunelab server`, `make server`): MLflow's runs in a
real PostgreSQL, artifacts proxied by `mlflow server` (clients upload and download through it:
`mlflow-artifacts:` URIs), both on 127.0.0.1, everything under one state directory:

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
database. `tunelab server` runs it in the foreground; Ctrl-C or SIGTERM stops MLflow, then
PostgreSQL (`pg_ctl stop -m fast`). Only the standard library is imported at the top; psycopg,
psutil and mlflow's server are used inside functions.

The modules, from the bottom up: `processes` (ports, commands, process groups), `credentials`
(secret files, MLflow's login), `roles` (PostgreSQL's roles, passwords, pg_hba.conf), `state`
(the directory's lock and server.json), `postgres` (the cluster), `mlflow_process` (`mlflow
server`), `server` (`start_server`: both started, a `Server` that stops them), `command`
(`serve` in the foreground, `main`: the command line).
"""

from tunelab.teamserver.command import main, serve
from tunelab.teamserver.postgres import Binaries, Database, find_binaries
from tunelab.teamserver.processes import free_port, port_is_free
from tunelab.teamserver.roles import Passwords
from tunelab.teamserver.server import Server, start_server
from tunelab.teamserver.state import DEFAULT_DIR

__all__ = [
    "DEFAULT_DIR",
    "Binaries",
    "Database",
    "Passwords",
    "Server",
    "find_binaries",
    "free_port",
    "main",
    "port_is_free",
    "serve",
    "start_server",
]
