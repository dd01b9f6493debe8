"""Where nin tune keeps its trials: an Optuna database named by URL, checked before anything is read or written.

A URL that does not parse, a database SQLAlchemy does not know, a driver that is not installed (with the
package to install), a server that does not answer, or an SQLite path that cannot hold a database is one
line naming the URL, never with its password."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from nin.errors import NinError

URL_FORM = ("DIALECT[+DRIVER]://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE, e.g. sqlite:///path/to/tune.db or "
            "postgresql://user:password@host:5432/db")


DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")


# pip packages of SQLAlchemy's drivers, by driver name (a URL without +DRIVER uses its dialect's default)
DRIVER_PACKAGES = {
    "psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "pg8000": "pg8000", "mysqldb": "mysqlclient",
    "pymysql": "pymysql", "mysqlconnector": "mysql-connector-python", "mariadbconnector": "mariadb",
    "pyodbc": "pyodbc", "pymssql": "pymssql", "oracledb": "oracledb", "cx_oracle": "cx_Oracle",
}


def _shown(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        return url if parsed.password is None else parsed.render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not parseable: shown as given, less anything between user: and @
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _where(url: str, flag: bool) -> str:
    return f"{'--storage ' if flag else ''}{_shown(url)}: cannot open it"


def parse_storage(url: str, flag: bool = True):
    """The SQLAlchemy URL of a storage, checked without opening it, or a one-line NinError saying what is wrong
    (naming it as ``--storage URL`` if ``flag``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if not url.strip():
        raise NinError(f"--storage: not a database URL: {url!r}; a database URL is {URL_FORM}")
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # no DIALECT://, or a port that is not a number
        journal = "" if "://" in url else "; nin tune keeps its trials in a database, not in an Optuna journal file"
        raise NinError(f"--storage: not a database URL: {_shown(url)!r}; a database URL is {URL_FORM}"
                       f"{journal}") from None
    where = _where(url, flag)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        backend, _, driver = parsed.drivername.partition("+")
        if driver and backend in DIALECTS:
            raise NinError(f"{where}: SQLAlchemy has no {backend} driver {driver!r}; leave +{driver} out for the "
                           f"default one, or name another") from None
        raise NinError(f"{where}: {backend!r} is not a database SQLAlchemy knows ({', '.join(DIALECTS)}, ...); "
                       f"nin tune keeps its trials in a database, not in an Optuna journal or Redis storage, "
                       f"e.g. sqlite:///path/to/tune.db") from None
    if getattr(dialect, "is_async", False):
        raise NinError(f"{where}: {parsed.get_driver_name()} is an asyncio driver, which Optuna cannot use; name "
                       f"another, e.g. {parsed.get_backend_name()}://...")
    if parsed.get_backend_name() == "sqlite" and not parsed.query.get("uri"):
        if parsed.database in (None, "", ":memory:"):
            raise NinError(f"{where}: an in-memory SQLite database is gone when nin tune ends and is not shared "
                           f"with its workers; name a file, e.g. sqlite:///path/to/tune.db")
        path = Path(parsed.database)
        if path.is_dir():
            raise NinError(f"{where}: {path} is a directory; " + (f"name a database file, e.g. sqlite:///"
                           f"{path.resolve() / 'tune.db'}" if flag else "remove it or choose another --out"))
        if not path.parent.is_dir():
            raise NinError(f"{where}: the folder {path.parent} "
                           f"{'is not a directory' if path.parent.exists() else 'does not exist'}; create it or "
                           f"choose another path")
    return parsed


def _first_line(e: BaseException, password: str | None) -> str:
    """The first line of an error (a driver's own for SQLAlchemy's), without the URL's password."""
    e = getattr(e, "orig", None) or e
    line = (str(e).strip().splitlines() or [type(e).__name__])[0].strip()
    return line.replace(password, "***") if password else line


def _storage_error(where: str, parsed, e: BaseException) -> NinError:
    """A one-line NinError for a storage that failed to open."""
    from sqlalchemy import exc

    optuna = import_optuna()
    if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
        e = e.__cause__  # Optuna's wrapper around the database's error
    why = _first_line(e, parsed.password)
    if isinstance(e, ImportError):
        driver_failed = isinstance(e.__cause__, ImportError)  # Optuna's "Failed to import DB access module"
        cause = e.__cause__ if driver_failed else e
        module = getattr(cause, "name", None)
        if not driver_failed:
            return NinError(f"{where}: {why}" + (f"; pip install {module.split('.')[0]}" if module else ""))
        driver = parsed.get_driver_name()
        package = DRIVER_PACKAGES.get(driver.lower()) or (module or driver).split(".")[0]
        if isinstance(cause, ModuleNotFoundError):
            return NinError(f"{where}: its driver {driver} is not installed (no module {module!r}); "
                            f"pip install {package}")
        return NinError(f"{where}: its driver {driver} does not import ({_first_line(cause, parsed.password)}); "
                        f"reinstall it: pip install --force-reinstall {package}")
    if parsed.get_backend_name() == "sqlite" and isinstance(e, exc.DBAPIError):
        if not isinstance(e, exc.OperationalError):  # sqlite3.DatabaseError: file is not a database
            return NinError(f"{where}: {parsed.database} is not an SQLite database ({why}); choose another file")
        return NinError(f"{where}: SQLite says {why!r}; check that {parsed.database} and its folder are writable "
                        f"and that it is an SQLite database")
    if isinstance(e, exc.OperationalError):
        return NinError(f"{where}: the database server did not let us in ({why}); check the host, port, user, "
                        f"password and database name, and that the server is running")
    if isinstance(e, exc.DBAPIError):
        return NinError(f"{where}: the database refused ({why})")
    return NinError(f"{where}: {why}")  # an engine argument SQLAlchemy refuses, or Optuna's schema check


def open_storage(url: str, flag: bool = True):
    """An Optuna RDB storage for ``url``; SQLite waits for other writers instead of failing at once.

    A bad URL, a missing driver, a server that does not answer, a SQLite file that cannot be made: one line
    naming the URL (without its password), as ``--storage URL`` if ``flag``.
    """
    optuna = import_optuna()
    from sqlalchemy import exc

    parsed = parse_storage(url, flag)
    sqlite = parsed.get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    try:
        # Heartbeats let a later run mark trials of a killed worker failed instead of running forever.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=60, grace_period=180)
    except (ImportError, exc.ArgumentError, exc.DBAPIError, optuna.exceptions.StorageInternalError,
            RuntimeError) as e:  # RuntimeError: Optuna's table schema check, which says how to upgrade
        raise _storage_error(_where(url, flag), parsed, e) from None


def import_optuna():
    """The optuna module, or a one-line error saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise NinError("nin tune needs Optuna: pip install optuna (or pip install 'nin[tune]')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # nin tune prints its own lines
    return optuna
