"""Griffe extension for the API reference: render the reST bits of the docstrings as Markdown.

The source docstrings are Google style with a few reStructuredText constructs that
Markdown would print verbatim. This extension rewrites them when the package is
loaded, for the documentation only; the source stays as it is:

* ``.. versionadded:: 0.1`` becomes "*Added in version 0.1.*";
* ``:class:`X```, ``:func:`X```, ``:meth:`X```, ``:exc:`X``` and ``:attr:`X``` become a
  link to X's entry in the reference when it is there, inline code otherwise
  (``~`` shows only the last name, as in Sphinx);
* a paragraph ending in ``::`` followed by an indented block becomes a paragraph
  ending in ``:`` followed by a fenced Python code block.

mkdocs.yml loads it with ``extensions: [docs/_griffe/rst_compat.py:RstCompat]``.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

PACKAGE = "di_request_scope"
# The modules rendered in docs/reference.md: links may only point into these.
DOCUMENTED = ("di_request_scope", "di_request_scope.sqlalchemy", "di_request_scope.fastapi")

VERSIONADDED = re.compile(r"^\.\. versionadded:: *(\S+) *$", re.MULTILINE)
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|exc|attr|obj|mod|data):`(~?)([\w.]+)(?:\(\))?`")


def _index(package: griffe.Module) -> dict[str, str]:
    """Public name -> the path under which docs/reference.md renders it."""
    index: dict[str, str] = {}
    for module_path in DOCUMENTED:
        module = package if module_path == package.path else package[module_path.split(".", 1)[1]]
        exported = module.exports
        for name in module.members:
            if name.startswith("_") or (exported is not None and name not in exported):
                continue
            index.setdefault(name, f"{module_path}.{name}")
    return index


def _enclosing_class(obj: griffe.Object) -> griffe.Object | None:
    current: griffe.Object | None = obj
    while current is not None and not current.is_class:
        current = current.parent
    return current


def _target(name: str, obj: griffe.Object, index: dict[str, str]) -> str | None:
    """The rendered path of a role's target, or None when it is not in the reference."""
    parts = name.split(".")
    if parts[0] == PACKAGE:  # di_request_scope[.module].Name[.member]
        parts = parts[1:]
        if len(parts) > 1 and parts[0] not in index:
            parts = parts[1:]
    if not parts:
        return None
    first, rest = parts[0], ".".join(parts[1:])
    if first in index:
        return index[first] + (f".{rest}" if rest else "")
    cls = _enclosing_class(obj)
    if cls is not None and first in cls.members and cls.name in index:
        return f"{index[cls.name]}.{name}"
    return None


def _roles(text: str, obj: griffe.Object, index: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name
        target = _target(name, obj, index)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    return ROLE.sub(replace, text)


def _literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        opens_block = line.rstrip().endswith("::") and line.strip() != "::"
        if opens_block and i + 1 < len(lines) and not lines[i + 1].strip():
            j = i + 2
            block: list[str] = []
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith((" ", "\t"))):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            if block:
                code = textwrap.dedent("\n".join(block)).split("\n")
                out += [line.rstrip()[:-1], "", "```python", *code, "```"]
                if j < len(lines):
                    out.append("")
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _objects(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class RstCompat(griffe.Extension):
    """Rewrite the package's reST docstring constructs as Markdown once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != PACKAGE:
            return
        index = _index(pkg)
        for obj in _objects(pkg):
            if obj.docstring is None:
                continue
            text = VERSIONADDED.sub(r"*Added in version \1.*", obj.docstring.value)
            obj.docstring.value = _literal_blocks(_roles(text, obj, index))
