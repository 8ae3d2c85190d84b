"""The ``sparkd`` command: run the daemon, and the operator tools around it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import DEFAULT_PATH, Config, ConfigError, load_config


def check_config(path: Path, check_images: bool = True) -> int:
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"{path}: {len(error.problems)} problem(s):", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    keys_problem = _keys_problems(config)
    if keys_problem:
        return 1
    enabled = config.enabled_models()
    off = [m for m in config.models.values() if not m.enabled]
    print(
        f"{path}: OK: {len(config.models)} models ({len(enabled)} enabled, {len(off)} off), "
        f"listening on {', '.join(config.server.listen)}, policy {config.lifecycle.policy}"
    )
    for model in off:
        kind = "experimental" if model.experimental else "disabled"
        reason = model.disabled_reason or model.experimental_reason or "no reason given"
        print(f"  off: {model.name} ({kind}): {reason}")
    for model in enabled:
        for note in model.notes:
            if note.startswith("Known issue"):
                print(f"  note: {model.name}: {note}")
    if check_images:
        from .commands import mounts

        mounts.report(config)
    return 0


def _keys_problems(config: Config) -> bool:
    """Print the problems of the keys file (``server.keys_file``); True when it has some.

    A missing file, or one this user may not read, is the daemon's to report: it is not checked here;
    nor is its owner, which is the user sparkd runs as, not necessarily the one running the check.
    """
    import os

    from .config.keys import KeysFileError, read_keys_file

    path = Path(config.server.keys_file)
    if not os.access(path, os.R_OK):
        print(f"  note: keys file {path} not checked (missing, or not readable by this user)")
        return False
    try:
        read_keys_file(path, required=False, check_owner=False)
    except KeysFileError as error:
        print(f"{error.path}: {len(error.problems)} problem(s):", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkd", description="Serve many vLLM models on one GPU box, on demand.")
    parser.add_argument("--version", action="version", version=f"sparkd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=DEFAULT_PATH, help=f"configuration file (default {DEFAULT_PATH})")
        return sub

    command("serve", "run the daemon in the foreground (systemd runs this)")
    check = command("check-config", "validate the configuration and list every problem")
    check.add_argument("--no-images", action="store_true", help="do not ask Podman whether a mount hides files of a model's image")
    command("doctor", "check Podman, the GPU's CDI spec, images, encodings, disk and the listen port")
    encodings = command("encodings", "fetch or check the tiktoken encodings GPT-OSS models need")
    encodings.add_argument("action", choices=("fetch", "check"))
    encodings.add_argument("--from", dest="source", default=None, help="mirror URL holding the .tiktoken files")
    images = command("images", "list or build the engine images through Podman")
    images.add_argument("action", choices=("list", "build"))
    images.add_argument("names", nargs="*", help="recipes to build (default: those the enabled models use)")
    images.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    images.add_argument("--containerfiles", type=Path, default=None, help="directory holding the recipes")
    images.add_argument("--tag", default=None, help="build the one named recipe under this image name instead of its own")
    clients = command("clients", "print OpenCode or Cline configuration for the models that can run on this host")
    clients.add_argument(
        "client", choices=("opencode", "cline", "cline-vscode"),
        help="opencode: opencode.json; cline: the Cline CLI's `cline auth` command; cline-vscode: the VS Code extension's settings",
    )
    clients.add_argument("--base-url", default=None, help="URL clients use (default: the first listen address)")
    clients.add_argument("--all", action="store_true", help="list every enabled model, also those this host cannot run")
    return parser


def _load(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as error:
        print(f"{path} is invalid ({len(error.problems)} problem(s)); run `sparkd check-config` first", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config, check_images=not args.no_images)
    if args.command == "serve":
        from .daemon import serve  # aiohttp and podman load only when serving

        return serve(args.config)
    config = _load(args.config)
    if config is None:
        return 1
    if args.command == "doctor":
        from .commands import doctor

        return doctor.run(config)
    if args.command == "encodings":
        from .commands import encodings

        if args.action == "check":
            return encodings.check(config.server.state_dir)
        return encodings.fetch(config.server.state_dir, *([args.source] if args.source else []))
    if args.command == "images":
        from .commands import images

        if args.action == "list":
            return images.list_images(config)
        build_args = dict(item.split("=", 1) for item in args.build_arg if "=" in item)
        return images.build(config, args.names, build_args, args.containerfiles, args.tag)
    from .commands import clients

    base_url = args.base_url or f"http://{config.server.listen[0]}/v1"
    return clients.run(config, args.client, base_url, include_all=args.all)


if __name__ == "__main__":
    sys.exit(main())
