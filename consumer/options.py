"""Command-line options that can also come from environment variables.

Every option is a flag (``--window-seconds``) and an environment variable
(``ANOMALY_WINDOW_SECONDS``); the flag wins. A bad value stops the program with one
line naming the option and where the value came from, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn


class OptionError(ValueError):
    """A value that an option does not accept; the message says why."""


@dataclass(frozen=True)
class Option:
    """One option: its flag, how to parse its text, its default and its help line."""

    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def env(self, prefix: str) -> str:
        return prefix + self.dest.upper()


def fail(prog: str, message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 2, as argparse does for usage errors."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_options(
    options: Sequence[Option],
    argv: Sequence[str] | None,
    *,
    prog: str,
    env_prefix: str,
    description: str,
    environ: Mapping[str, str] | None = None,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict[str, Any]:
    """Parse flags, fall back to environment variables, then to defaults.

    ``arguments`` may add plain argparse arguments (positionals, say): their values are
    in the result too, under their ``dest``, and have no environment variable.
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Every option can also be set as an environment variable: {env_prefix}<NAME>.",
    )
    for opt in options:
        shown = "(secret)" if opt.secret else opt.default
        parser.add_argument(
            opt.flag,
            dest=opt.dest,
            default=None,
            metavar=opt.dest.upper(),
            help=f"{opt.help} [env {opt.env(env_prefix)}, default: {shown}]",
        )
    if arguments is not None:
        arguments(parser)
    namespace = parser.parse_args(argv)
    dests = {opt.dest for opt in options}
    values: dict[str, Any] = {k: v for k, v in vars(namespace).items() if k not in dests}
    for opt in options:
        raw = getattr(namespace, opt.dest)
        origin = opt.flag
        if raw is None and opt.env(env_prefix) in environ:
            raw = environ[opt.env(env_prefix)]
            origin = f"{opt.flag} (from {opt.env(env_prefix)})"
        if raw is None:
            values[opt.dest] = opt.default
            continue
        try:
            values[opt.dest] = opt.parse(raw)
        except (OptionError, ValueError) as exc:
            shown_raw = "<hidden>" if opt.secret else repr(raw)
            fail(prog, f"invalid value {shown_raw} for {origin}: {exc}")
    return values


# Parsers: each takes the option's text and returns its value or raises OptionError.


def text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise OptionError("must not be empty")
    return value


def optional_text(raw: str) -> str | None:
    return raw.strip() or None


def number(
    *, minimum: float | None = None, maximum: float | None = None, exclusive_min: bool = False
) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise OptionError("must be a number") from None
        if not math.isfinite(value):
            raise OptionError("must be a finite number")
        if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
            raise OptionError(f"must be {'>' if exclusive_min else '>='} {minimum:g}")
        if maximum is not None and value > maximum:
            raise OptionError(f"must be <= {maximum:g}")
        return value

    return parse


def integer(*, minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise OptionError("must be a whole number") from None
        if minimum is not None and value < minimum:
            raise OptionError(f"must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise OptionError(f"must be <= {maximum}")
        return value

    return parse


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise OptionError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def name_list(raw: str) -> tuple[str, ...] | None:
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    if len(set(names)) != len(names):
        raise OptionError("names must not repeat")
    return names or None


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise OptionError("must be true or false")
