"""The ``modelpress`` console script, whichever of the three installs is there.

    pip install modelpress              client commands (upload, compress, jobs, download, ...;
                                        ``keys`` with --url/--api-key): modelpress/_cli.py
    pip install 'modelpress[server]'    + serve (cluster mode), migrate, reconcile, keys on the database
    pip install 'modelpress[worker]'    + worker, and serve in embedded mode (it starts a worker)

The parser and the server commands are ``app/cli.py``'s; that module imports only the standard
library and ``modelpress._cli`` at its top, so building the parser works with the SDK alone. Before
a server command runs, the packages of the extra it needs are looked up (``find_spec``, nothing
imported): when one is missing the command prints which extra to install and exits 2, instead of
a traceback from deep inside the server's imports.

Shell completion (``modelpress completion bash|zsh|fish``) runs this same entry point at each TAB
with ``_ARGCOMPLETE`` set: :func:`complete` answers from the parser and exits before any command.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

EXIT_MISSING_EXTRA = 2

# Import names (not distribution names) of the packages each extra brings that the commands need.
SERVER_MODULES = ("fastapi", "uvicorn", "pydantic_settings", "sqlalchemy", "alembic", "psycopg", "celery", "kombu")
WORKER_MODULES = (*SERVER_MODULES, "torch", "transformers", "safetensors", "compressed_tensors")

_DB_KEYS_COMMANDS = ("cmd_keys_create", "cmd_keys_list", "cmd_keys_show", "cmd_keys_revoke")


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _embedded_worker() -> bool:
    """``serve`` starts a worker subprocess: embedded mode with MODELPRESS_EMBEDDED_WORKER on (the
    defaults; the settings are read from the environment only, core/config.py)."""
    mode = os.environ.get("MODELPRESS_MODE", "embedded").strip().lower()
    flag = os.environ.get("MODELPRESS_EMBEDDED_WORKER", "true").strip().lower()
    return mode == "embedded" and flag not in ("0", "false", "no", "off", "n", "f")


def required_extra(command: str, args: argparse.Namespace) -> tuple[str, tuple[str, ...]] | None:
    """The extra (and its modules) that the parsed command needs, or None for a client command."""
    if command in _DB_KEYS_COMMANDS:
        from modelpress._cli import through_api

        return None if through_api(args) else ("server", SERVER_MODULES)
    if command == "cmd_worker" or (command == "cmd_serve" and _embedded_worker()):
        return "worker", WORKER_MODULES
    return "server", SERVER_MODULES


def _refusal(args: argparse.Namespace, extra: str, missing: list[str]) -> str:
    words = [args.command] + ([args.keys_command] if getattr(args, "keys_command", None) else [])
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    line = (
        f"modelpress {' '.join(words)}: needs the {extra} extra (missing: {shown}); "
        f"install it with: pip install 'modelpress[{extra}]'"
    )
    if extra == "worker" and args.command == "serve":
        line += (
            " (embedded mode runs a worker next to the API; for the API alone: "
            "MODELPRESS_MODE=cluster, or MODELPRESS_EMBEDDED_WORKER=false)"
        )
    if args.command == "keys":
        line += " (or pass --url / --api-key to manage keys through a running API)"
    return line


def complete(
    parser: argparse.ArgumentParser, *, output: TextIO | None = None, exit_method: Callable[[int], Any] = os._exit
) -> None:
    """Answer the shell's TAB, when this process was started for one (``modelpress completion``
    printed the script that does so): argcomplete writes the candidates (to fd 8, or ``output``)
    and exits. argcomplete is imported only then: otherwise this is one environment lookup."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        from argcomplete.finders import CompletionFinder  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return  # no completions rather than a traceback under the user's prompt

    class Finder(CompletionFinder):  # type: ignore[misc,unused-ignore]
        def _init_debug_stream(self) -> None:
            """argcomplete writes its debug output to fd 9, which the shell's script opens; with
            ``output`` given (in-process, tests) fd 9 may be some other file (pytest's), which
            argcomplete's wrapper would close: debug output goes to stderr then (argcomplete's
            documented override)."""
            if output is None:
                super()._init_debug_stream()  # type: ignore[no-untyped-call,unused-ignore]

    Finder()(parser, output_stream=output, exit_method=exit_method)


def main(argv: list[str] | None = None) -> int:
    from app import cli

    parser = cli.build_parser()
    complete(parser)
    args = parser.parse_args(argv)
    command = getattr(args.fn, "__name__", "")
    if command in cli._SERVER_COMMANDS:
        needed = required_extra(command, args)
        if needed is None:
            # `keys ... --url/--api-key`: a client command. Run it here: cli.main would set up the
            # server's logging first, which needs the server's settings (the server extra).
            return int(args.fn(args) or 0)
        extra, modules = needed
        missing = missing_modules(modules)
        if missing:
            print(_refusal(args, extra, missing), file=sys.stderr)
            return EXIT_MISSING_EXTRA
        return cli.main(argv)
    # A client command: what cli.main would do with it (no server logging), without a second parse.
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
