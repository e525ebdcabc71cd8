"""Reading YAML written by users (recipes, task files) safely, with one-line refusals.

``yaml.safe_load`` already refuses arbitrary objects, but an untrusted file can
still hang the loader with nested aliases (a "billion laughs" document expands
to gigabytes) or crash it with RecursionError (thousands of nested brackets).
So aliases are refused (layerzo's own files never need them), the file size is
capped, and every failure becomes the caller's error class with the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_YAML_BYTES = 1024 * 1024  # a recipe or task file is a few hundred bytes
MAX_FLOW_DEPTH = 64  # [ { nesting; PyYAML recurses per level and takes ~1 s to hit the recursion limit


class NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases: a document can no longer expand itself exponentially."""

    def compose_node(self, parent, index):  # noqa: D102 - PyYAML's hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed here",
                                              event.start_mark)
        return super().compose_node(parent, index)


def flow_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting in ``text`` (brackets inside quotes count too: a cheap upper bound)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}" and depth:
            depth -= 1
    return deepest


def read_yaml(path: Path, error: type[Exception], what: str, loader: type = NoAliasLoader) -> Any:
    """The parsed document of ``path``, or ``error`` with one line naming ``what`` and the problem.

    ``loader`` must derive from :class:`NoAliasLoader` (a caller may add its own resolvers).
    """
    if not issubclass(loader, NoAliasLoader):
        raise TypeError("read_yaml needs a NoAliasLoader subclass")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise error(f"{what} {path} is {size} bytes; a YAML file of more than {MAX_YAML_BYTES} bytes is refused")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if flow_depth(text) > MAX_FLOW_DEPTH:
        raise error(f"{what} {path} nests too deeply to be a {what}")
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise error(f"{what} {path} nests too deeply to be a {what}") from None
    except (ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError) as exc:
        # a tag whose value PyYAML's constructors cannot build (!!float abc, !!timestamp x, !!bool maybe)
        raise error(f"{what} {path} is not valid YAML ({type(exc).__name__}: {exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise error(f"{what} {path} is not valid YAML{at} ({problem})") from None
