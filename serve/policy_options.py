"""The `PolicyConfig` knobs as command-line options, declared once.

The benchmark scripts that vary the scheduling knobs (benchmarks/load.py, load_sweep.py, sim_load.py,
engine_trace_load.py) take their options from here: each is named after its field (``--aging-queue-factor``),
defaults to `PolicyConfig`'s default and is helped by the first sentence of the field's docstring, so a new knob
or a changed default reaches every script at once. `s3 serve`, `s3 bench` and `s3 simulate` set the same fields
through their config files and ``--set policy.<name>=<value>``.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from typing import Callable

import click

from serve.policy_config import PolicyConfig

KNOBS = ("quantile", "aging_s", "aging_queue_factor", "resume_first", "short_queue", "wait_steps")
"""The knobs the benchmarks vary, in the order their options are listed."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal under its annotation), whitespace collapsed."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def knob_help(name: str) -> str:
    """The first sentence of the knob's `PolicyConfig` docstring."""
    return re.split(r"(?<=\.)\s+(?=[A-Z0-9`])", field_docs(PolicyConfig)[name], maxsplit=1)[0]


def policy_options(names: tuple[str, ...] = KNOBS) -> Callable:
    """A decorator adding one click option per knob: ``--name`` (``--name/--no-name`` for a flag), with
    `PolicyConfig`'s default and type."""
    unknown = set(names) - set(PolicyConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"not PolicyConfig fields: {', '.join(sorted(unknown))}")

    def decorate(command: Callable) -> Callable:
        for name in reversed(names):  # click lists options in decorator order, top first
            default, flag = getattr(PolicyConfig, name), "--" + name.replace("_", "-")
            declared = (f"{flag}/--no-{flag[2:]}",) if isinstance(default, bool) else (flag,)
            typed = {} if isinstance(default, bool) else {"type": type(default)}
            command = click.option(*declared, default=default, show_default=True, help=knob_help(name),
                                   **typed)(command)
        return command

    return decorate
