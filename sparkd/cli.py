"""The ``sparkd`` command: ``serve`` the daemon, ``check-config`` a configuration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import DEFAULT_PATH, ConfigError, load_config


def check_config(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"{path}: {len(error.problems)} problem(s):", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkd", description="Serve many vLLM models on one GPU box, on demand.")
    parser.add_argument("--version", action="version", version=f"sparkd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the daemon in the foreground (systemd runs this)"),
        ("check-config", "validate the configuration and list every problem"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", type=Path, default=DEFAULT_PATH, help=f"configuration file (default {DEFAULT_PATH})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    from .daemon import serve  # aiohttp and podman load only when serving

    return serve(args.config)


if __name__ == "__main__":
    sys.exit(main())
