"""The README's reference tables, generated from the code so the two cannot drift apart.

    python -m daemon.ops.reference           # rewrite README.md's generated blocks (make docs)
    python -m daemon.ops.reference --check   # exit 1 if README.md is out of date

Each table lives between `<!-- BEGIN GENERATED name -->` and
`<!-- END GENERATED name -->` in README.md:

- `config`: every setting of `daemon.config.Config`: its key, environment
  variable, command-line flag, default and help text;
- `metrics`: every metric of `daemon.ops.metrics.METRICS`: name, type, labels, help.

tests/daemon/test_reference.py fails when README.md and the code disagree.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from daemon import config
from daemon.ops import metrics

README: Final = config.REPO_ROOT / "README.md"
_BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED (?P<name>[a-z-]+) -->\n)"
    r"(?P<body>.*?)"
    r"(<!-- END GENERATED (?P=name) -->)",
    re.DOTALL,
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _size(value: int) -> str:
    for unit, factor in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if value >= factor and value % factor == 0:
            return f" ({value // factor} {unit})"
    return ""


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, int):
        return f"`{value}`{_size(value)}"
    if isinstance(value, float):
        return f"`{value!r}`"
    if isinstance(value, tuple):  # a list setting: as TOML (and --print-config) writes it
        return "`[" + ", ".join(f'"{item}"' for item in value) + "]`"
    if isinstance(value, Path):
        if value.is_absolute() and value.is_relative_to(config.REPO_ROOT):
            # Where the code is installed, not where these docs were generated.
            return f"`<checkout>/{value.relative_to(config.REPO_ROOT)}`"
        return f"`{value}` (relative to the working directory)"
    return f'`"{value}"`' if value != "" else '`""`'


def serve_flags() -> dict[str, str]:
    """Setting -> its own `comfy-progress serve` flag, read from the real parser."""
    from daemon.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            serve = action.choices["serve"]
            return {
                a.dest: a.option_strings[-1]
                for a in serve._actions
                if a.dest in config.FIELDS and a.option_strings
            }
    raise AssertionError("comfy-progress has no serve command")


def config_table() -> str:
    flags = serve_flags()
    rows = []
    for name, field in config.FIELDS.items():
        flag = flags.get(name, f"--set {name}=...")
        rows.append(
            (
                f"`{name}`",
                f"`{config.ENV_PREFIX}{name.upper()}`",
                f"`{flag}`",
                _default(field.default),
                str(field.metadata["help"]),
            )
        )
    return _table(("key", "environment", "flag", "default", "meaning"), rows)


def metrics_table() -> str:
    rows = []
    for spec in metrics.METRICS:
        meaning = spec.help
        buckets = metrics.HISTOGRAM_BUCKETS.get(spec.name)
        if buckets is not None:
            shown = ", ".join(f"{bound:g}" for bound in buckets)
            meaning += f"; buckets {shown}, +Inf; series `_bucket`, `_sum`, `_count`"
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "none"
        rows.append((f"`{spec.name}`", spec.type, labels, meaning))
    return _table(("metric", "type", "labels", "meaning"), rows)


GENERATORS: Final[Mapping[str, Callable[[], str]]] = {
    "config": config_table,
    "metrics": metrics_table,
}


def update(text: str) -> str:
    """`text` with every generated block rewritten; unknown or missing blocks are errors."""
    seen: set[str] = set()

    def replace(found: re.Match[str]) -> str:
        name = found.group("name")
        if name not in GENERATORS:
            raise ValueError(f"unknown generated block {name!r}")
        seen.add(name)
        return found.group(1) + GENERATORS[name]() + found.group(4)

    updated = _BLOCK.sub(replace, text)
    missing = set(GENERATORS) - seen
    if missing:
        raise ValueError(f"README.md lacks the generated block(s): {', '.join(sorted(missing))}")
    return updated


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.ops.reference", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if out of date")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    updated = update(text)
    if args.check:
        if updated != text:
            print(f"{args.readme} is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        args.readme.write_text(updated, encoding="utf-8")
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
