"""Where the audit log lives: a SQLite file (the default, a plain path) or PostgreSQL (a URL), and its
schema, brought to the newest Alembic revision at start (no alembic.ini: the config is built here)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from qguard.audit.schema import TABLE, VERSION_TABLE
from qguard.errors import InputError, QGuardError

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_S = 5.0  # how long a SQLite write waits on another process's lock before it counts as failed
CONNECT_TIMEOUT_S = 5
# Alembic's `context` and `op` are process-wide proxies: two migrations at once in one process (two
# logs, or a writer thread migrating late) would run inside each other's context
_MIGRATING = threading.Lock()  # PostgreSQL: an unreachable server is an error after this, not a hang


class AuditError(QGuardError):
    """The audit database cannot be reached, or is not a qguard audit database."""


def database_url(target: str | os.PathLike) -> sa.URL:
    """The SQLAlchemy URL of `target`: a file path (SQLite), a `sqlite:///` URL, or a `postgresql://` /
    `postgres://` URL (driven by psycopg 3). Anything else is an InputError naming the forms."""
    text = os.fspath(target).strip()
    if not text:
        raise InputError("audit database: empty; give a file path (SQLite) or a postgresql://... URL")
    if "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text).expanduser().absolute()))
    try:
        url = make_url(text)
    except ArgumentError:
        raise InputError(f"audit database: {text!r} is not a database URL; give a file path (SQLite) or "
                         "postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME") from None
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise InputError(f"audit database: the {driver!r} driver is not supported; use postgresql://... "
                             "(qguard talks to PostgreSQL through psycopg 3)")
        if not url.database:
            raise InputError(f"audit database: {describe(url)} names no database (postgresql://HOST/DBNAME)")
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise InputError(f"audit database: the {driver!r} SQLite driver is not supported; use sqlite:///PATH")
        if url.database in (None, "", ":memory:") or url.database.startswith("file:"):
            raise InputError("audit database: an in-memory SQLite database would vanish with the process; "
                             "give a file path")
        return url.set(drivername="sqlite", database=str(Path(url.database).expanduser().absolute()))
    raise InputError(f"audit database: unsupported kind {url.drivername!r} in {describe(url)}; give a file "
                     "path (SQLite) or a postgresql://... URL")


def describe(url: sa.URL) -> str:
    """The URL as messages show it: a SQLite file as its path, a server URL without its password."""
    if url.get_backend_name() == "sqlite":
        return str(url.database)
    return url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)


def create_engine(url: sa.URL, pool_size: int = 1, statement_timeout_s: float | None = None) -> sa.Engine:
    """An engine for the audit log. Connections are checked before use (`pool_pre_ping`), so after the
    database restarts the next write gets a fresh connection instead of a dead one. PostgreSQL:
    `statement_timeout_s` cancels a statement that waits longer (e.g. on a lock someone holds), which the
    writer then treats as an outage and retries."""
    try:
        if url.get_backend_name() == "sqlite":
            engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_S}, pool_pre_ping=True)
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        connect = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "qguard-audit"}
        if statement_timeout_s is not None:
            connect["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
        return sa.create_engine(url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True, connect_args=connect)
    except ImportError as e:  # the driver is an optional dependency
        raise AuditError(f"audit database: {describe(url)} needs {e.name or 'its driver'}: "
                         "pip install 'qguard[audit]'") from None


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL: `qguard audit` can read while the server writes; NORMAL sync is crash-safe under WAL
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _alembic():
    # imported on use: alembic logs a line per plugin at import, which a server start does not need
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    import alembic.command
    import alembic.config
    import alembic.runtime.migration
    import alembic.script

    return alembic


def alembic_config(url: sa.URL | str | None = None):
    """Alembic's config for the audit schema, built in code. With a URL, Alembic's own commands work on
    it (e.g. `alembic.command.revision(alembic_config(url), "add a column", autogenerate=True)`)."""
    cfg = _alembic().config.Config()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    if url is not None:
        text = url.render_as_string(hide_password=False) if isinstance(url, sa.URL) else url
        cfg.set_main_option("sqlalchemy.url", text.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    return _alembic().script.ScriptDirectory.from_config(alembic_config()).get_current_head()


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest revision (`upgrade head`): creates it in an empty database, does
    nothing on one that is up to date."""
    cfg = alembic_config()
    with _MIGRATING, engine.begin() as conn:
        cfg.attributes["connection"] = conn
        _alembic().command.upgrade(cfg, "head")


def current_revision(conn: sa.Connection) -> str | None:
    context = _alembic().runtime.migration.MigrationContext
    return context.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def open_database(target: str | os.PathLike, create: bool = True, connect: bool = True,
                  statement_timeout_s: float | None = None) -> tuple[sa.Engine, sa.URL]:
    """(engine, url) of the audit database at `target`, connected once and migrated to head.

    `create=False` is for readers (`qguard audit`): a missing SQLite file is an error rather than a new
    empty database, and the schema is checked, never changed. `connect=False` only checks the target and
    builds the engine (the writer then migrates once the database answers). Errors name the database
    (never its password) and what to do."""
    url = database_url(target)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database)
        if path.is_dir():
            raise InputError(f"audit database: {path} is a directory; give a file such as {path / 'audit.db'}")
        if not create and not path.exists():
            raise InputError(f"audit database: no such file {path}")
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise AuditError(f"audit database: cannot create the folder {path.parent} "
                                 f"({e.strerror})") from None
    engine = create_engine(url, statement_timeout_s=statement_timeout_s)
    if not connect:
        return engine, url
    try:
        if create:
            migrate(engine)
        else:
            with engine.connect() as conn:
                if not sa.inspect(conn).has_table(TABLE):
                    raise AuditError(f"audit database: {describe(url)} holds no qguard audit log "
                                     f"(no table {TABLE})")
    except SQLAlchemyError as e:
        engine.dispose()
        raise AuditError(f"audit database: cannot use {describe(url)}: {reason(e)}") from None
    except BaseException:
        engine.dispose()
        raise
    return engine, url


def reason(e: BaseException) -> str:
    """A database error in one line, without SQLAlchemy's statement dump and parameters (which would
    print the rows, message text included when it is stored)."""
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__
