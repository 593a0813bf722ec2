"""Reading what other people wrote: bounded YAML and bounded templates.

Suites, recipes, lm-eval task files and their templates come from files that
users share. Nothing in them runs code, and the work one of them can cause is
bounded before it is done, not measured after:

- YAML goes through ``BoundedLoader``: documents past ``MAX_YAML_BYTES``,
  more than ``MAX_ALIASES`` aliases, or aliases that expand past
  ``MAX_YAML_NODES`` nodes are refused while composing, before anything is
  expanded (a 329-byte "billion laughs" recipe once became a 47 MB record).
- Templates render in jinja2's immutable sandbox (no attribute access such as
  ``__globals__``, no mutation), with ``**`` refused, repetition and output
  capped at ``MAX_RENDERED`` characters as they grow, and each render held to
  ``RENDER_SECONDS`` of time and ``RENDER_MEMORY`` bytes of new address space
  (``bounded_work``): a join that would build 995 million characters fails
  at its allocation, a loop that runs too long is stopped by a timer.

This module imports only jinja2 and yaml, so a child process can measure it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import yaml

from qbench.core.errors import QBenchError

#: Largest YAML document qbench reads from a user's file.
MAX_YAML_BYTES = 4 * 2**20
#: Aliases (``*name``) one document may use.
MAX_ALIASES = 100
#: Nodes one document may hold once its aliases are expanded.
MAX_YAML_NODES = 200_000
#: Nesting depth of one document (PyYAML composes nodes recursively).
MAX_YAML_DEPTH = 100
#: Longest text a template may build, or repeat.
MAX_RENDERED = 1_000_000
#: Time one template render may take.
RENDER_SECONDS = 2.0
#: Address space one template render may add to its process.
RENDER_MEMORY = 256 * 2**20


class YamlTooLarge(yaml.YAMLError):
    """A document past the bounds; the message says which."""


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting aliases and the nodes they expand to
    while the document is composed (an alias shares its anchor's node, so
    the expanded size is computed once per node)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlTooLarge(f"more than {MAX_ALIASES} aliases (*name): write the content out instead")
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise YamlTooLarge(f"it nests deeper than {MAX_YAML_DEPTH} levels")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._sizes:
            if isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes.get(id(item), 1) for item in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
            if size > MAX_YAML_NODES:
                raise YamlTooLarge(
                    f"its aliases expand to more than {MAX_YAML_NODES:,} nodes (a YAML bomb?): "
                    "write the content out without anchors"
                )
        return node


def load_yaml(text: str, where: str | Path, loader: type[BoundedLoader] = BoundedLoader) -> Any:
    """A user's YAML document, within the bounds above; any problem is one
    line naming ``where`` (the file) and, for a syntax error, the line."""
    if len(text.encode("utf-8", "replace")) > MAX_YAML_BYTES:
        raise QBenchError(
            f"{where}: larger than {MAX_YAML_BYTES // 2**20} MiB, more than a qbench YAML file "
            "should hold: split it or trim it"
        )
    try:
        return yaml.load(text, Loader=loader)
    except YamlTooLarge as exc:
        raise QBenchError(f"{where}: refused: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise QBenchError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


class RenderTimeout(Exception):
    """Raised by the timer of ``bounded_work`` inside the render it bounds."""


def _address_space() -> Optional[int]:
    """This process's virtual memory size in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def bounded_work(seconds: float = RENDER_SECONDS, memory: int = RENDER_MEMORY) -> Iterator[None]:
    """Hold the work inside to ``seconds`` (a timer that raises
    ``RenderTimeout``; main thread only, where Python delivers signals) and
    to ``memory`` bytes of new address space (RLIMIT_AS lowered to the
    current size plus ``memory``, so an allocation past it raises
    MemoryError; Linux). Both are restored after, including a timer someone
    else had set, which fires late rather than never."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    current = _address_space()
    limit = None
    if current is not None:
        limit = current + memory if hard == resource.RLIM_INFINITY else min(current + memory, hard)
        if soft != resource.RLIM_INFINITY and soft <= limit:
            limit = None  # already bounded more tightly
    timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    started = time.monotonic()
    if timed:

        def expire(signum, frame):
            raise RenderTimeout(f"took longer than {seconds:g} s")

        previous_handler = signal.signal(signal.SIGALRM, expire)
        previous_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_handler)
            delay, interval = previous_timer
            if delay > 0:
                signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - started), 1e-3), interval)


def template_environment():
    """The environment every user template renders in: jinja2's immutable
    sandbox, which refuses attribute access such as ``__class__`` or
    ``__globals__`` (the way out to ``os.system``) and any call that
    mutates, plus: ``**`` refused, ``*`` repetition capped, and each render
    bounded in output, time and memory (``BoundedTemplate``). A template can
    read the document's fields and apply filters, nothing more."""
    from jinja2 import StrictUndefined, Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class BoundedTemplate(Template):
        def render(self, *args: Any, **kwargs: Any) -> str:
            pieces, size = [], 0
            try:
                with bounded_work():
                    for piece in self.generate(*args, **kwargs):
                        size += len(piece)
                        if size > MAX_RENDERED:
                            raise SecurityError(f"the template renders more than {MAX_RENDERED:,} characters")
                        pieces.append(piece)
            except RenderTimeout as exc:
                raise SecurityError(f"the template {exc} to render") from None
            except RecursionError:
                raise SecurityError("the template recurses too deeply to render") from None
            except MemoryError:
                raise SecurityError(f"the template needs more than {RENDER_MEMORY // 2**20} MiB to render") from None
            return "".join(pieces)

    class TaskTemplates(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])
        template_class = BoundedTemplate

        def _parse(self, source, name, filename):
            try:
                return super()._parse(source, name, filename)
            except RecursionError:  # jinja2 parses expressions recursively
                raise SecurityError("the template nests too deeply to parse") from None

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                raise SecurityError("the power operator is not allowed in task templates")
            if isinstance(left, (str, list)) or isinstance(right, (str, list)):
                count = right if isinstance(left, (str, list)) else left
                size = len(left if isinstance(left, (str, list)) else right)
                if isinstance(count, int) and size * max(count, 0) > MAX_RENDERED:
                    raise SecurityError(f"a repetition longer than {MAX_RENDERED:,} is not allowed")
            return super().call_binop(context, operator, left, right)

    return TaskTemplates(undefined=StrictUndefined, autoescape=False)
