"""The `generate` subcommand's flags, and running it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import trio

from daemon.terminal.client import EXIT_USAGE, TOKEN_VARIABLE, GenerateClient, Options
from daemon.terminal.display import Display

DEFAULT_SERVER = "http://127.0.0.1:8000"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate",
        help="generate one image from the terminal, with a live progress bar",
        description="Submit PROMPT to a running daemon, show its progress on stderr, print "
        "the image URL on stdout. Ctrl-C cancels the task. A daemon with api_tokens needs "
        "one in the environment: COMFY_PROGRESS_API_TOKEN. Exit status: 0 done, 1 failed "
        "(the server's message on stderr), 2 bad usage, 130 interrupted.",
    )
    p.add_argument("prompt", help="what to draw, e.g. 'a red fox'")
    p.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        metavar="URL",
        help=f"the daemon's base URL, a path prefix allowed (default {DEFAULT_SERVER})",
    )
    p.add_argument("--output", "-o", type=Path, metavar="FILE", help="save the image to FILE")
    p.add_argument("--workflow", metavar="NAME", help="workflow template (default: txt2img)")
    p.add_argument("--seed", type=int, metavar="N", help="sampler seed (default: random)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another workflow parameter, e.g. --param steps=30; VALUE is read as JSON "
        "when it can be (numbers, true, false), else as text",
    )


def _not_json(constant: str) -> Any:
    """NaN, Infinity, -Infinity: Python's JSON reader takes them, JSON has none."""
    raise ValueError(f"{constant} is not JSON")


def parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--param {item!r}: expected NAME=VALUE")
        try:
            value: Any = json.loads(raw, parse_constant=_not_json)
        except ValueError:
            value = raw
        params[name.strip()] = value
    return params


def generate(args: argparse.Namespace) -> int:
    if not args.server.startswith("http://"):
        print(f"comfy-progress: --server {args.server!r} must be an http:// URL", file=sys.stderr)
        return EXIT_USAGE
    try:
        params = parse_params(args.param)
    except ValueError as exc:
        print(f"comfy-progress: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = Options(
        prompt=args.prompt,
        server=args.server,
        output=args.output,
        workflow=args.workflow,
        seed=args.seed,
        params=params,
        # Set from a file, it may end in a newline or CR (a token never has
        # whitespace); sent as is, the header was refused: "cannot reach the daemon".
        token=os.environ.get(TOKEN_VARIABLE, "").strip() or None,
    )

    async def main() -> int:
        display = Display(sys.stderr, tty=sys.stderr.isatty(), clock=trio.current_time)
        return await GenerateClient(options, display=display, out=sys.stdout).main()

    return trio.run(main)
