"""``sparkctl``: watch and drive a running sparkd.

By default it talks to the local admin socket (``/run/sparkd/sparkd.sock``, i.e.
``<server.runtime_dir>/sparkd.sock``): its file permissions grant access (root and
the ``sparkd`` group), no key needed.  ``--url http://HOST:8009`` reaches a sparkd
over HTTP with an admin key from ``$SPARKD_ADMIN_KEY`` or a file (``--key-file``,
owned by you, mode 0600), never from the command line, which every local user
can read in ``ps``.

Human output by default, ``--json`` for scripts.  Exit codes: 0 done, 1 sparkd
refused or something failed (e.g. ``prepare`` found a missing image), 2 usage,
3 sparkd unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..private_files import PrivateFileError, read_private_file
from . import pulls, render
from .adminclient import DEFAULT_SOCKET, Client, CtlError, Target, model_path

DEFAULT_CONFIG = "/etc/sparkd/sparkd.toml"


# -- commands ----------------------------------------------------------------------------


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    data = client.get_json("/api/status")
    emit(args, data, render.status_with_fleet)
    if not args.json:
        pulling = pulls.status_lines(client)
        if pulling:
            print("\nweights being pulled:\n" + "\n".join("  " + line for line in pulling))
    return 0


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    data = client.get_json("/api/models")
    emit(args, data, render.models)
    return 0


def cmd_action(client: Client, args: argparse.Namespace) -> int:
    action, name = args.command, args.model
    began = time.monotonic()
    watcher = _ProgressLine(client, name) if action in ("start", "wake") and sys.stderr.isatty() and not args.json else None
    if watcher:
        watcher.start()
    try:
        data = client.post_json(f"{model_path(name)}/{action}")
    finally:
        if watcher:
            watcher.stop()
    took = time.monotonic() - began
    data.setdefault("took_s", round(took, 3))
    emit(args, data, lambda d: f"{d['model']}: {d['state']} (took {render.duration(took) if took >= 1 else f'{took:.1f}s'})")
    return 0


class _ProgressLine:
    """While ``start`` waits, redraw the model's load progress on the terminal (stderr)."""

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self._name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                data = self._client.get_json("/api/status", timeout=5)
            except CtlError:
                continue
            model = next((m for m in data["models"] if m["name"] == self._name), None)
            if model is None:
                continue
            line = f"{self._name}: {model['state']} {render.progress(model)}"
            sys.stderr.write("\r\x1b[K" + line[:200])
            sys.stderr.flush()


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    query = f"?tail={args.lines}" + ("&follow=1" if args.follow else "")
    response = client.open("GET", f"{model_path(args.model)}/logs{query}", timeout=None if args.follow else 60)
    out = sys.stdout.buffer
    try:
        while True:
            chunk = response.read1(65536)
            if not chunk:
                break
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        response.close()
    return 0


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    shown = 0
    clear = sys.stdout.isatty() and not args.json
    try:
        for data in client.events(args.delay):
            if args.json:
                print(json.dumps(data, separators=(",", ":")), flush=True)
            else:
                frame = render.status(data)
                recent = render.recent(data)
                server = data.get("server", {})
                header = f"sparkd {server.get('version', '?')} on {server.get('instance', '?')} - {time.strftime('%H:%M:%S')}"
                text = header + "\n\n" + frame + ("\n\nrecent:\n" + recent if recent else "")
                if clear:
                    sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
                else:
                    sys.stdout.write(text + "\n" + "-" * 40 + "\n")
                sys.stdout.flush()
            shown += 1
            if args.iterations and shown >= args.iterations:
                return 0
    except KeyboardInterrupt:
        return 0
    print("sparkctl: sparkd ended the status stream (it is stopping or restarting)", file=sys.stderr)
    return 0


def cmd_prepare(client: Client, args: argparse.Namespace) -> int:
    data = client.post_json("/api/prepare", {"models": args.models} if args.models else None)
    emit(args, data, render.prepare)
    return 0 if data["ok"] else 1


def cmd_history(client: Client, args: argparse.Namespace) -> int:
    query = f"?days={args.days}&limit={args.limit}"
    if args.model:
        query += "&model=" + args.model
    data = client.get_json("/api/history" + query)
    emit(args, data, render.history)
    return 0


def cmd_usage(client: Client, args: argparse.Namespace) -> int:
    query = {"days": str(args.days)}
    if args.key:
        query["key"] = args.key
    if args.model:
        query["model"] = args.model
    data = client.get_json("/api/usage?" + urllib.parse.urlencode(query))
    emit(args, data, render.usage)
    return 0


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(human(data))


# -- the command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument("--socket", default=argparse.SUPPRESS, help=f"the admin socket (default: $SPARKD_SOCKET or {DEFAULT_SOCKET})")
    group.add_argument("--config", default=argparse.SUPPRESS, help=f"take the socket from this configuration's server.runtime_dir (default {DEFAULT_CONFIG} when the default socket is missing)")
    group.add_argument("--url", default=argparse.SUPPRESS, help="a sparkd over HTTP instead, e.g. http://spark:8009 (default: $SPARKD_URL)")
    group.add_argument("--key-file", default=argparse.SUPPRESS, metavar="PATH", help="a file (yours, mode 0600) holding the admin key for --url (default: $SPARKD_ADMIN_KEY)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")

    parser = argparse.ArgumentParser(
        prog="sparkctl", description="Watch and drive a running sparkd.", parents=[connection],
        epilog="Exit codes: 0 done, 1 refused or failed, 2 usage, 3 sparkd unreachable.",
    )
    parser.add_argument("--version", action="version", version=f"sparkctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[connection])

    add("status", "every model: state, claim, in flight, queued, uptime, idle, load progress and ETA; the lease and the queue")
    add("models", "the catalog: enabled, experimental and disabled models with their notes")
    for action, text in (
        ("start", "start a model and wait until it is ready"),
        ("stop", "drain a model (running requests finish) and stop its container"),
        ("sleep", "drain a model and put its engine to sleep (vLLM sleep mode)"),
        ("wake", "wake a sleeping model (or start it) and wait until it is ready"),
    ):
        add(action, text).add_argument("model")
    logs = add("logs", "a model's container log")
    logs.add_argument("model")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following new output (across restarts) until Ctrl-C")
    logs.add_argument("-n", "--lines", type=int, default=100, metavar="N", help="start with the last N lines (default 100)")
    top = add("top", "live-refreshing status (Ctrl-C to quit)")
    top.add_argument("-d", "--delay", type=float, default=1.0, metavar="SECONDS", help="refresh at least this often (default 1)")
    top.add_argument("-n", "--iterations", type=int, default=0, metavar="N", help="stop after N refreshes (default: never)")
    prepare = add("prepare", "create the containers of the enabled (or named) models ahead of time and check their images")
    prepare.add_argument("models", nargs="*", metavar="model")
    pulling = add("pull", "download models' weights into the cache their containers mount (resumable), with progress")
    pulling.add_argument("models", nargs="*", metavar="model")
    pulling.add_argument("--all-enabled", action="store_true", help="every enabled model that names an hf_model")
    history = add("history", "load times, sessions, requests and tokens per day, peak memory")
    history.add_argument("model", nargs="?")
    history.add_argument("--days", type=int, default=30, help="per-day usage for this many days (default 30)")
    history.add_argument("--limit", type=int, default=20, help="this many recent sessions and loads (default 20)")
    usage = add("usage", "requests, tokens, errors and queue wait per key name, model and day")
    usage.add_argument("--key", metavar="NAME", help="only this key (its name in the keys file)")
    usage.add_argument("--model", metavar="M", help="only this model")
    usage.add_argument("--days", type=int, default=7, metavar="N", help="the last N days, today included (default 7)")
    return parser


HANDLERS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": cmd_status,
    "models": cmd_models,
    "start": cmd_action,
    "stop": cmd_action,
    "sleep": cmd_action,
    "wake": cmd_action,
    "logs": cmd_logs,
    "top": cmd_top,
    "prepare": cmd_prepare,
    "history": cmd_history,
    "usage": cmd_usage,
    "pull": pulls.cmd_pull,
}


def resolve_target(args: argparse.Namespace) -> Target:
    url = getattr(args, "url", None) or os.environ.get("SPARKD_URL")
    if url:
        key_file = getattr(args, "key_file", None)
        return Target(url=url, key=read_key_file(key_file) if key_file else os.environ.get("SPARKD_ADMIN_KEY"))
    socket_path = getattr(args, "socket", None) or os.environ.get("SPARKD_SOCKET")
    if socket_path:
        return Target(socket_path=socket_path)
    config = getattr(args, "config", None)
    if config is None and not os.path.exists(DEFAULT_SOCKET) and os.path.exists(DEFAULT_CONFIG):
        config = DEFAULT_CONFIG
    if config is not None:
        return Target(socket_path=str(Path(runtime_dir(config)) / "sparkd.sock"))
    return Target(socket_path=DEFAULT_SOCKET)


def read_key_file(path: str) -> str:
    """The admin key in ``path``, checked like sparkd checks its keys file (owner you, mode 0600)."""
    try:
        key = read_private_file(path).decode("utf-8").strip()
    except FileNotFoundError:
        raise CtlError(f"--key-file {path}: no such file", exit_code=2) from None
    except PrivateFileError as error:
        raise CtlError(f"--key-file {path} cannot be used: {error}", exit_code=2) from None
    except (UnicodeDecodeError, OSError) as error:
        raise CtlError(f"--key-file {path} cannot be read: {error}", exit_code=2) from None
    if not key:
        raise CtlError(f"--key-file {path} is empty: put the admin key in it", exit_code=2)
    return key


def key_on_command_line(argv: list[str]) -> bool:
    """A ``--key`` on the command line, except ``sparkctl usage --key NAME``, where it is a key's name."""
    command = next((index for index, arg in enumerate(argv) if arg in HANDLERS), len(argv))
    checked = argv[:command] if command < len(argv) and argv[command] == "usage" else argv
    return any(arg == "--key" or arg.startswith("--key=") for arg in checked)


def runtime_dir(config: str) -> str:
    """``server.runtime_dir`` of a configuration file (without validating the rest of it)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(config, "rb") as handle:
            document = tomllib.load(handle)
    except (OSError, ValueError) as error:
        raise CtlError(f"cannot read {config} to find the admin socket: {error}; give --socket", exit_code=2) from None
    server = document.get("server")
    value = server.get("runtime_dir") if isinstance(server, dict) else None
    return value if isinstance(value, str) else "/run/sparkd"


def main(argv: list[str] | None = None) -> int:
    if key_on_command_line(sys.argv[1:] if argv is None else argv):
        print(
            "sparkctl: --key is not accepted: a key on the command line is visible to every local user (ps, "
            "/proc/<pid>/cmdline) and lands in shell history. Put it in the environment (SPARKD_ADMIN_KEY) or in a "
            "file only you can read (chmod 600) and pass --key-file PATH",
            file=sys.stderr,
        )
        return 2
    args = build_parser().parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    try:
        client = Client(resolve_target(args))
        return HANDLERS[args.command](client, args)
    except CtlError as error:
        if args.json and error.payload is not None:
            print(json.dumps(error.payload, indent=2))
        print(f"sparkctl: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
