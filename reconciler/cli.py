"""The ``cst`` command line: thin wrappers over the desired file, the engine, the runtime and the server."""
from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import os
import re
import ssl
import sys
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import aiohttp
import click
import uvloop

from proxy.budget import daily_document
from proxy.cli import proxy_command
from proxy.ledger import StoreUnavailable
from proxy.pool import mask
from proxy.service import read_usage

from . import __version__
from .desired.model import DesiredState, TlsSettings, load, parse, port_of
from .desired.problems import InvalidDesiredState
from .desired.safe_yaml import Located, read_text
from .desired.schema import schema
from .desired.secret_source import SecretUnavailable
from .desired.shared_file import DesiredFile
from .desired.validation import is_loopback_host
from .engine.inventory import instance_rows
from .engine.reconcile import reconcile_once, standing_halt
from .engine.results import Report, Result
from .files import atomic_write
from .kubernetes import names as kubernetes_names
from .kubernetes import output as render_output
from .kubernetes import render as kubernetes
from .kubernetes import secrets as kubernetes_secrets
from .runtime import disk_use, overlay, sandbox, sillytavern, wiring
from .runtime.base import LaunchImpossible, StartFailed
from .runtime.local import LocalRuntime
from .runtime.logfollow import MAX_LINES, last_lines
from .runtime.logfollow import follow as follow_log
from .runtime.restore import restore_snapshot
from .runtime.snapshots import SnapshotNotFound, Snapshots
from .runtime.statedir import LockHeld, StateDir
from .server.daemon import Daemon, DaemonError, tls_context
from .server.documents import row_document, snapshot_document

EXIT_INVALID = 1
EXIT_FAILED = 2


class CommandError(click.ClickException):
    """What ends a command, said on stderr as ``error: <message>`` with the command's exit code."""

    exit_code = EXIT_FAILED
    prefix = "error: "

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"{self.prefix}{self.format_message()}", err=True, file=file)


class Invalid(CommandError):
    """The input is wrong (the file, an argument); nothing was changed."""

    exit_code = EXIT_INVALID


class FileInvalid(Invalid):
    """The desired-state file has problems: one ``file:line: path: message`` line each."""

    prefix = ""

    def __init__(self, exc: InvalidDesiredState):
        super().__init__("\n".join(str(problem) for problem in exc.problems))


class Failed(CommandError):
    """The work could not be done (another cst holds the state dir, an instance did not start)."""

# what click's option decorators are: a command's function in, the same function out
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _file_option(*names: str) -> Decorator:
    return click.option(*names, "file", type=click.Path(dir_okay=False, path_type=Path), envvar="CST_FILE",
                        default="desired.yaml", show_default=True, show_envvar=True, help="The desired-state file.")


file_option = _file_option("-f", "--file")
output_option = click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
                             show_default=True)


def load_or_exit(path: Path) -> DesiredState:
    try:
        desired = load(path)
    except InvalidDesiredState as exc:
        raise FileInvalid(exc) from None
    for warning in desired.warnings:
        click.echo(f"warning: {warning}", err=True)
    return desired


class _Commands(click.Group):
    """cst's commands, with click's usage errors (an unknown option, a bad argument) exiting
    ``EXIT_INVALID`` as every other wrong input does, where click would exit 2: 2 means that an
    action failed (the README's table of exit codes)."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _as_invalid(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:   # a subcommand's arguments, or a BadParameter raised in its body
            raise _as_invalid(exc) from None


def _as_invalid(exc: click.UsageError) -> click.UsageError:
    # click exits with the raised instance's exit_code: set on the instance, it keeps the error's
    # own wording and usage hint (click declares exit_code a class variable, hence the ignore)
    exc.exit_code = EXIT_INVALID  # type: ignore[misc]
    return exc


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="cst", message="%(prog)s %(version)s")
def cli() -> None:
    """CST: a fleet of SillyTavern servers and one API-key pool, from one desired-state file."""


@cli.command()
@file_option
def validate(file: Path) -> None:
    """Check the file; print one line per problem (file:line: path: message)."""
    desired = load_or_exit(file)
    click.echo(f"{file}: valid ({len(desired.instances)} instances, {len(desired.accounts)} accounts)")


@cli.command()
@file_option
@click.option("--check", is_flag=True, help="Change nothing; show what would change.")
@click.option("--diff", is_flag=True, help="Show each change as observed -> desired.")
@click.option("--wait", type=click.FloatRange(min=0), default=60, show_default=True,
              help="Seconds to wait while another cst works on the same state dir.")
@click.option("--remote", metavar="URL", default=None,
              help="With --check: ask the cst serve at URL what this file would change there (POST /api/plan, "
                   "the admin key from settings.api.admin_key_env); nothing runs here.")
@output_option
def apply(file: Path, check: bool, diff: bool, wait: float, remote: str | None, output: str) -> None:
    """Make what runs match the file: start, stop, restart and archive instances."""
    desired = load_or_exit(file)
    if remote is not None:
        if not check:
            raise click.BadParameter("a remote host is only asked what would change: add --check", param_hint="--remote")
        _remote_plan(remote, file, desired, output)
        return

    def show(result: Result) -> None:
        if output == "text":
            for line in result.lines(diff):
                click.echo(line)

    try:
        report: Report = asyncio.run(reconcile_once(LocalRuntime(desired, readonly=check), desired, check=check,
                                                    on_result=show, lock_timeout=wait))
    except LockHeld as exc:
        raise Failed(str(exc)) from None
    if output == "json":
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(report.recap_line())
    _say_without_gate(desired)
    if report.count("failed") or report.halt:
        raise Failed(f"{report.count('failed')} failed (see above)" if report.count("failed") else
                     "the rollout stands halted (see above); it goes on when the file asks for another release")


def _say_without_gate(desired: DesiredState) -> None:
    """Instances with park_after are parked and woken by cst serve only (the edge serves the rest)."""
    parking = [spec.id for spec in desired.instances if spec.park_after is not None and spec.state == "running"]
    if parking and not StateDir(desired.settings.state_dir).held("daemon"):
        shown = ", ".join(parking[:5]) + (f" and {len(parking) - 5} more" if len(parking) > 5 else "")
        click.echo(f"warning: park_after is set for {shown}: cst serve parks and wakes them, and no cst serve "
                   f"runs on {desired.settings.state_dir} (a parked one answers 503 until it does)", err=True)


def _day_option(name: str, dest: str, help_: str) -> Decorator:
    return click.option(name, dest, type=click.DateTime(["%Y-%m-%d"]), default=None, help=help_)


@cli.command()
@file_option
@click.option("-o", "--output", type=click.Choice(["text", "json", "csv"]), default="text", show_default=True)
@_day_option("--from", "first", "Daily totals from this day (YYYY-MM-DD, in settings.usage.timezone).")
@_day_option("--to", "last", "Daily totals up to this day, inclusive (default: today).")
@click.option("--instance", "caller", default=None, help="Only this caller (an instance id, client or anonymous).")
def usage(file: Path, output: str, first: datetime | None, last: datetime | None, caller: str | None) -> None:
    """What each instance used of the key pool: today and this month against its budget; or, with
    --from/--to/--instance, daily totals (-o csv for billing). Read from the ledger in the state dir,
    with or without cst serve."""
    desired = load_or_exit(file)
    try:
        book, store = read_usage(desired)
    except (SecretUnavailable, StoreUnavailable) as exc:
        raise Failed(f"cannot read the usage store: {exc}") from None
    try:
        if first is None and last is None and caller is None:
            _show_windows(book.document(i.id for i in desired.instances), output)
            return
        window = book.window()
        first_day = first.date().isoformat() if first else window["month"] + "-01"
        last_day = last.date().isoformat() if last else window["day"]
        if first_day > last_day:
            raise click.BadParameter(f"{first_day} is after --to {last_day}", param_hint="--from")
        totals = store.daily(first_day, last_day, caller) if store is not None else []
        _show_days(daily_document(window, totals, first_day, last_day), output)
    except StoreUnavailable as exc:
        raise Failed(f"cannot read the usage store: {exc}") from None
    finally:
        if store is not None:
            store.close()


def _remote_plan(url: str, file: Path, desired: DesiredState, output: str) -> None:
    """``cst apply --check --remote URL``: the host's plan for this file, printed as it is here."""
    env = desired.settings.api.admin_key_env
    key = os.environ.get(env)
    if not key:
        raise Invalid(f"{env} (settings.api.admin_key_env) is not set: the remote host's admin key "
                                   "comes from it")
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--remote")

    async def ask() -> tuple[int, dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=300)
        data = await asyncio.to_thread(file.read_bytes)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(url.rstrip("/") + "/api/plan", data=data,
                             headers={"X-ST-Admin-Key": key, "Content-Type": "application/yaml"}) as answer:
            try:
                body = await answer.json(content_type=None)
            except ValueError:
                body = {}
            return answer.status, body if isinstance(body, dict) else {}

    try:
        status, body = asyncio.run(ask())
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise Failed(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if status != 200:
        reason = body.get("error") or body.get("message") or f"HTTP {status}"
        raise Failed(f"{url} answered {status}: {reason}")
    if output == "json":
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo(body.get("text", ""), nl=False)
    if (body.get("recap") or {}).get("failed"):
        raise Failed(f"{body['recap']['failed']} would fail on {url} (see above)")


def _echo_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart, as `cst status` prints them."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


USAGE_COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens", "tokens", "estimated")


def _show_windows(document: dict[str, Any], output: str) -> None:
    if output == "json":
        click.echo(json.dumps(document, indent=2))
        return
    rows = []
    for caller, entry in document["instances"].items():
        budget, left = entry["budget"] or {}, entry["left"] or {}
        rows.append([caller, entry["today"]["requests"], entry["today"]["tokens"], budget.get("tokens_per_day"),
                     left.get("tokens_per_day"), entry["month"]["tokens"], budget.get("tokens_per_month"),
                     left.get("tokens_per_month"), budget.get("requests_per_minute")])
    header = ["instance", "requests_today", "tokens_today", "tokens_per_day", "left_today", "tokens_month",
              "tokens_per_month", "left_month", "requests_per_minute"]
    window = document["window"]
    _table(header, rows, output, f"{window['day']} ({window['timezone']}); the day resets at "
                                 f"{window['resets']['day']}, the month at {window['resets']['month']}")


def _show_days(document: dict[str, Any], output: str) -> None:
    if output == "json":
        click.echo(json.dumps(document, indent=2))
        return
    rows = [[day["day"], day["instance"], *(day[c] for c in USAGE_COLUMNS)] for day in document["days"]]
    _table(["day", "instance", *USAGE_COLUMNS], rows, output,
           f"{document['from']} to {document['to']} ({document['window']['timezone']})")


def _table(header: list[str], rows: list[list[Any]], output: str, caption: str) -> None:
    if output == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
        click.echo(out.getvalue(), nl=False)
        return
    click.echo(caption)
    _echo_table(header, [["-" if v is None else str(v) for v in row] for row in rows])


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


@cli.command()
@file_option
@output_option
def status(file: Path, output: str) -> None:
    """Show every instance: desired and observed state, pid, uptime, restarts, its data dir and the
    disk that uses (as a running cst serve last measured it, else walked now); and a rollout that
    stands halted."""
    desired = load_or_exit(file)
    use = disk_use.current(desired, StateDir(desired.settings.state_dir))
    runtime = LocalRuntime(desired, readonly=True)
    rows = instance_rows(runtime, desired, disk=use.get)
    halt = standing_halt(runtime, desired)
    if halt is not None:
        click.echo(halt.line(), err=output == "json")
    if output == "json":
        click.echo(json.dumps([row_document(row) for row in rows], indent=2))
        return
    _echo_table(("ID", "PORT", "DESIRED", "STATUS", "PID", "UPTIME", "MEMORY", "RESTARTS", "DISK", "DATA DIR", "URL"),
                [(r.id, str(r.port), r.desired, r.status, str(r.pid or "-"), _uptime(r.uptime),
                  _mib(r.memory), str(r.restarts), _mib(r.disk), str(r.data_dir), r.url or "-")
                 for r in rows])
    if rows:
        click.echo(f"disk used by the data dirs: {_mib(sum(r.disk or 0 for r in rows))}")


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.0f}MiB"


@cli.command()
@file_option
@click.argument("instance_id")
def password(file: Path, instance_id: str) -> None:
    """Print an instance's basic-auth password (the user name is the instance id)."""
    desired = load_or_exit(file)
    if port_of(instance_id) is None:
        raise click.BadParameter(f"{instance_id!r} is not an instance id (like st-instance-8001)",
                                 param_hint="INSTANCE_ID")
    spec = desired.instance(instance_id)
    if spec is None:
        raise Invalid(f"{instance_id} is not declared in {file}")
    try:
        secret = LocalRuntime(desired, readonly=True).password(spec)
    except LaunchImpossible as exc:
        raise Invalid(str(exc)) from None
    if not secret:
        raise Invalid(f"{instance_id} has no password yet: it is generated on its first start")
    click.echo(secret)


@cli.command()
@_file_option("--file")  # -f is --follow here, as in `tail -f`
@click.argument("instance_id")
@click.option("-n", "--lines", type=click.IntRange(0, MAX_LINES), default=15, show_default=True,
              help="How many of the last lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep showing lines as they are written, until Ctrl-C.")
def logs(file: Path, instance_id: str, lines: int, follow: bool) -> None:
    """Show an instance's log (stdout and stderr), as `pm2 logs` does."""
    desired = load_or_exit(file)
    if port_of(instance_id) is None:
        raise click.BadParameter(f"{instance_id!r} is not an instance id (like st-instance-8001)",
                                 param_hint="INSTANCE_ID")
    path = StateDir(desired.settings.state_dir).log_path(instance_id)
    if desired.instance(instance_id) is None and not path.exists():
        raise Invalid(f"{instance_id} is not declared in {file} and has no log")
    out = sys.stdout.buffer
    if not follow:
        out.write(last_lines(path, lines)[0])
        return

    async def show() -> None:
        async for chunk in follow_log(path, lines):
            out.write(chunk)
            out.flush()

    with contextlib.suppress(KeyboardInterrupt):   # Ctrl-C ends a follow: not an error
        asyncio.run(show())


@cli.command()
@file_option
@click.option("--ssl", "use_ssl", is_flag=False, flag_value="true", default=None, metavar="[true|false]",
              help="Serve the API over HTTPS (the seed's flag; or set settings.api.tls).")
@click.option("--certPath", "cert_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TLS certificate (PEM) for --ssl.")
@click.option("--keyPath", "key_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TLS private key (PEM) for --ssl.")
@click.option("-v", "--verbose", is_flag=True, help="Log every action, not only changes and errors.")
def serve(file: Path, use_ssl: str | None, cert_path: Path | None, key_path: Path | None, verbose: bool) -> None:
    """Run the daemon: REST API, file watcher and periodic resync, until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    desired = load_or_exit(file)
    context = None
    tls = desired.settings.api.tls
    if use_ssl is not None and use_ssl.lower() not in ("false", "0", "no"):
        if not cert_path or not key_path:
            raise click.UsageError("--ssl needs --certPath and --keyPath")
        tls = TlsSettings(cert_path.resolve(), key_path.resolve())
    if tls:
        try:
            context = tls_context(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise Invalid(f"cannot load the TLS certificate {tls.cert} / key {tls.key}: {exc}") from None
    listen = desired.settings.api.listen
    if context is None and not is_loopback_host(listen.host) and not desired.settings.api.insecure_http:
        raise Invalid(f"settings.api.listen is {listen}, beyond this machine, without TLS: the admin key would "
                      "cross the network in clear. Set settings.api.tls (or --ssl), or settings.api.insecure_http: "
                      "true to accept that")
    desired_file = DesiredFile(file)
    try:
        uvloop.run(Daemon(desired_file, desired_file.read()).run(context))  # serves the proxy too
    except (LockHeld, DaemonError) as exc:
        raise Failed(str(exc)) from None


@cli.group()
def st() -> None:
    """The SillyTavern release CST runs."""


@st.command("install")
@file_option
def st_install(file: Path) -> None:
    """Install every SillyTavern release the file uses (settings.sillytavern.version and each
    instance's own sillytavern_version) from the npm registry, pre-build each front end and lay
    CST's overlay over each (idempotent; lays the overlay again where a file of it was altered).
    One line per release."""
    desired = load_or_exit(file)
    failed = []
    sandboxed = sandbox.applies(desired.settings.sillytavern.sandbox)
    for version, fields in desired.versions().items():
        try:
            rel, done = sillytavern.install(version, desired.settings.state_dir, repair=True, sandboxed=sandboxed)
        except (sillytavern.InstallError, overlay.OverlayError, OSError) as exc:
            click.echo(f"failed: sillytavern {version} ({', '.join(fields)}): {exc}", err=True)
            failed.append(version)
            continue
        click.echo(f"changed: sillytavern {version} at {rel.package_dir} ({done})" if done
                   else f"ok: sillytavern {version} at {rel.package_dir}")
    if failed:
        raise Failed(f"sillytavern {', '.join(failed)} could not be installed")


@st.command("verify")
@file_option
def st_verify(file: Path) -> None:
    """Check that each release the file uses is installed as published plus CST's overlay, every
    file unchanged. One line per release."""
    desired = load_or_exit(file)
    if desired.settings.sillytavern.server is not None:
        click.echo(f"ok: settings.sillytavern.server is your own checkout ({desired.settings.sillytavern.server}); "
                   "only the npm release is verified")
        return
    failed = []
    for version in desired.versions():
        try:
            found = sillytavern.verify(version, desired.settings.state_dir)
        except (overlay.OverlayError, OSError) as exc:
            found = [str(exc)]
        package = sillytavern.release_of(version, desired.settings.state_dir).package_dir
        for problem in found:
            click.echo(f"failed: {problem}", err=True)
        if found:
            failed.append(f"sillytavern {version} at {package}")
        else:
            click.echo(f"ok: sillytavern {version} at {package}: the pinned release and CST's overlay, unchanged")
    if failed:
        raise Failed(f"{'; '.join(failed)}: not the pinned release plus CST's overlay")


@cli.command("rotate-key")
@file_option
@click.argument("instance_id")
@click.option("--wait", type=click.FloatRange(min=0), default=60, show_default=True,
              help="Seconds to wait while another cst works on the same state dir.")
def rotate_key(file: Path, instance_id: str, wait: float) -> None:
    """Give an instance a new proxy key; the old one stops working at once."""
    desired = load_or_exit(file)
    spec = desired.instance(instance_id)
    if spec is None:
        raise Invalid(f"{instance_id} is not declared in {file}")
    if not spec.proxy:
        raise Invalid(f"{instance_id} has proxy: false, so it has no proxy key")
    runtime = LocalRuntime(desired)
    try:
        with runtime.state.lock(timeout=wait):   # not while a pass starts the instance with the old key
            key = runtime.rotate_key(spec)
    except LockHeld as exc:
        raise Failed(str(exc)) from None
    click.echo(f"changed: {instance_id} has a new proxy key ({mask(key)}); the old one no longer works")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _instance_argument(instance_id: str) -> None:
    if port_of(instance_id) is None:
        raise click.BadParameter(f"{instance_id!r} is not an instance id (like st-instance-8001)",
                                 param_hint="INSTANCE_ID")


@cli.command()
@file_option
@click.argument("instance_id")
@output_option
def backups(file: Path, instance_id: str, output: str) -> None:
    """List an instance's snapshots (settings.backups, rollouts), oldest first."""
    desired = load_or_exit(file)
    _instance_argument(instance_id)
    snapshots = Snapshots(StateDir(desired.settings.state_dir)).list(instance_id)
    if output == "json":
        click.echo(json.dumps([snapshot_document(snapshot) for snapshot in snapshots], indent=2))
        return
    if not snapshots:
        click.echo(f"{instance_id} has no snapshots")
        return
    _echo_table(("SNAPSHOT", "TAKEN AT", "REASON", "FILES", "SIZE", "NEW"),
                [(s.id, s.taken_at, s.reason, str(s.files), _size(s.bytes_total), _size(s.bytes_new))
                 for s in snapshots])


@cli.command()
@file_option
@click.argument("instance_id")
@click.argument("snapshot_id")
@click.option("--wait", type=click.FloatRange(min=0), default=60, show_default=True,
              help="Seconds to wait while another cst works on the same state dir.")
def restore(file: Path, instance_id: str, snapshot_id: str, wait: float) -> None:
    """Put a snapshot back: stop the instance, keep its data dir in the archive, copy the snapshot
    in its place, start it again when the file says it runs."""
    desired = load_or_exit(file)
    _instance_argument(instance_id)
    spec = desired.instance(instance_id)
    if spec is None:
        raise Invalid(f"{instance_id} is not declared in {file}")
    try:
        restored = asyncio.run(restore_snapshot(LocalRuntime(desired), spec, snapshot_id, lock_timeout=wait))
    except SnapshotNotFound as exc:
        raise Invalid(f"{exc}; nothing was stopped (cst backups {instance_id} lists its snapshots)") from None
    except LockHeld as exc:
        raise Failed(f"{exc}; nothing was stopped") from None
    except (StartFailed, OSError) as exc:
        raise Failed(f"restoring {instance_id}: {exc}") from None
    kept = f"; the data it replaced is kept in {restored.replaced}" if restored.replaced else ""
    state = "running again" if restored.running else "stopped, as the file says"
    click.echo(f"changed: {instance_id} has its data of snapshot {restored.snapshot.id} again ({state}){kept}")


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The instance's data dir (its --dataRoot).")
@click.option("--package", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A folder holding the release's default/content/settings.json.")
@click.option("--proxy-url", required=True, metavar="URL", help="Where the instance reaches the key pool.")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The file holding the instance's proxy key.")
def wire(data_dir: Path, package: Path, proxy_url: str, key_file: Path) -> None:
    """Point a new instance's chat API at the key pool, once (what a start does on one machine; in a
    cluster, an instance's init step)."""
    try:
        key = key_file.read_text(encoding="utf-8").strip()
        done = wiring.wire(data_dir, package, proxy_url, key)
    except (OSError, ValueError) as exc:
        raise Failed(f"wiring {data_dir} to the key pool: {exc}") from None
    click.echo(f"changed: {done}" if done else f"ok: {data_dir} needs no wiring")


@cli.group()
def render() -> None:
    """desired.yaml for another engine: Kubernetes."""


def _for_cluster(file: Path, namespace: str | None) -> tuple[DesiredState, dict[str, Any]]:
    """The file, valid for a cluster too (located problems otherwise), and its document as written."""
    if namespace is not None and not re.match(schema()["$defs"]["dns_label"]["pattern"], namespace):
        raise Invalid(f"--namespace {namespace!r} is not a Kubernetes name (lower-case letters, digits, '-')")
    try:
        text = read_text(file)
        desired = parse(text, file)
    except InvalidDesiredState as exc:
        raise FileInvalid(exc) from None
    document = Located(text, str(file))
    found = [document.problem(path, message) for path, message in kubernetes.problems(desired)]
    if found:
        raise FileInvalid(InvalidDesiredState(found))
    for warning in desired.warnings:
        click.echo(f"warning: {warning}", err=True)
    return desired, document.data


@render.command("kubernetes")
@file_option
@click.option("-o", "--output", "folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write one file per object into this folder, replacing what an earlier render wrote there; "
                   "default: one YAML stream on stdout.")
@click.option("--namespace", default=None, help="The namespace of every object (default: settings.kubernetes.namespace).")
def render_kubernetes(file: Path, folder: Path | None, namespace: str | None) -> None:
    """Render the file as Kubernetes objects for kubectl apply, Argo CD or Flux: the same file gives the
    same bytes. Secrets are named, never written (see `cst render kubernetes-secrets`)."""
    desired, document = _for_cluster(file, namespace)
    rendering = kubernetes.render(desired, document, namespace)
    for note in rendering.notes:
        click.echo(f"note: {note.value}", err=True)
    if folder is None:
        click.echo(render_output.stream(rendering.objects, file.name), nl=False)
        return
    try:
        render_output.write_folder(rendering.objects, folder, file.name)
    except render_output.OutputRefused as exc:
        raise Invalid(str(exc)) from None
    except OSError as exc:
        raise Failed(f"writing {folder}: {exc}") from None
    click.echo(f"{folder}: {len(rendering.objects)} objects", err=True)


@render.command("kubernetes-secrets")
@file_option
@click.option("-o", "--output", "target", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              required=True, help="The file (written 0600) for `kubectl apply -f`; - for stdout.")
@click.option("--namespace", default=None, help="The namespace of every Secret (default: settings.kubernetes.namespace).")
def render_kubernetes_secrets(file: Path, target: Path, namespace: str | None) -> None:
    """Write the Secrets the render names: instances' passwords and proxy keys (minted here as on one
    machine, kept in the state dir), the pool's variables and files, the edge's certificate."""
    desired, _ = _for_cluster(file, namespace)
    try:
        made = kubernetes_secrets.make(desired, namespace or desired.settings.kubernetes.namespace)
    except LaunchImpossible as exc:
        raise Invalid(str(exc)) from None
    except OSError as exc:
        raise Failed(f"reading what the Secrets hold: {exc}") from None
    for name in made.missing:
        click.echo(f"warning: {name} is not set here: the Secret {kubernetes_names.POOL_ENV_SECRET} lacks it",
                   err=True)
    text = render_output.stream(made.objects, file.name)
    if str(target) == "-":
        click.echo(text, nl=False)
        return
    try:
        atomic_write(target, text.encode(), mode=0o600)
    except OSError as exc:
        raise Failed(f"writing {target}: {exc}") from None
    click.echo(f"{target}: {len(made.objects)} Secrets (0600: it holds every instance's password)", err=True)


cli.add_command(proxy_command)


def main() -> None:
    cli()
