"""The strict YAML reader of run, study and search files and of `key.path=value` override values.

YAML 1.2's core schema, not PyYAML's YAML 1.1 one: only true and false are booleans (yes, no, on, off stay
text, so a boolean field refuses them by name), numbers are YAML 1.2's (1e-3 is a float, 010 is ten; 1_000,
0b101 and 1:30 are text) and dates are text. Refused, each as one `StrictYAMLError` naming the place:
a key that is not text (`1: 2`, `{true: 3}`, `{null: 3}`), a key given twice in one mapping, nesting deeper
than MAX_DEPTH, aliases that expand to more than MAX_VALUES values (a "billion laughs" file) or refer to
themselves, and (in `read_file`) files larger than MAX_BYTES or that are not regular files. The checks run
on the composed node graph, before any Python value is built from it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

MAX_BYTES = 1 << 20        # a config file is a few KB; a larger one is the wrong file
MAX_DEPTH = 32             # nesting levels, aliases expanded; the deepest config is about 5
MAX_VALUES = 10_000        # values after expanding aliases; a large study file holds a few hundred

STR, MERGE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"
YAML11_BOOLEANS = ("yes", "no", "on", "off", "y", "n")   # what YAML 1.1 (or a human) may mean as a boolean


class StrictYAMLError(yaml.MarkedYAMLError):
    """A file that parses but is refused (keys, depth, aliases); `problem` says what and how to fix it."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 core-schema scalars and the checks of the module docstring."""

    yaml_implicit_resolvers: dict = {}   # rebuilt below: only YAML 1.2's

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise StrictYAMLError(None, None, f"nested deeper than {MAX_DEPTH} levels; a config is a few levels "
                                      f"deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_graph(node)
        return node


def _resolver(tag: str, pattern: str, first: str) -> None:
    StrictLoader.add_implicit_resolver(tag, re.compile(pattern, re.X), list(first))


_resolver("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF")
_resolver("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789")
_resolver("tag:yaml.org,2002:float",
          r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
          "-+0123456789.")
_resolver("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", "~nN")
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^$"), [""])
_resolver(MERGE, r"^(?:<<)$", "<")


def _construct_int(loader: StrictLoader, node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    if len(text) > 100:   # also keeps Python's 4300-digit conversion limit out of the way
        raise StrictYAMLError(None, None, f"an integer of {len(text)} digits; no field takes one", node.start_mark)
    return int(text)      # decimal, leading zeros too: YAML 1.2 reads 010 as ten (YAML 1.1 as eight)


StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _describe(node) -> str:
    if isinstance(node, ScalarNode):
        kind = node.tag.rsplit(":", 1)[-1]
        return f"{node.value!r} (read as {'a' if kind != 'int' else 'an'} {kind})"
    return "a list" if isinstance(node, SequenceNode) else "a mapping"


def _check_graph(root) -> None:
    """Walk the node graph once (a node shared through aliases once): text keys given once, the depth
    (aliases expanded) within MAX_DEPTH, the values (aliases expanded) within MAX_VALUES, no alias inside
    itself. The recursion stops at MAX_DEPTH, so it never runs deep."""
    done: dict[int, tuple[int, int]] = {}     # id(node) -> (values, height), aliases expanded
    active: set[int] = set()

    def refuse(where: str, problem: str, node):
        raise StrictYAMLError(None, None, f"{where or 'the file'}: {problem}", node.start_mark)

    def visit(node, depth: int, where: str) -> tuple[int, int]:
        key = id(node)
        if key in active:
            refuse(where, "an alias inside the value it names (an endless value)", node)
        if key not in done:
            active.add(key)
            if isinstance(node, SequenceNode):
                children = [(child, f"{where}[{i}]") for i, child in enumerate(node.value)]
            elif isinstance(node, MappingNode):
                children = _mapping_children(node, where)
            else:
                children = []
            size, height = 1, 1
            for child, place in children:
                if depth >= MAX_DEPTH:
                    refuse(place, f"nested deeper than {MAX_DEPTH} levels (aliases expanded); a config is a few "
                           f"levels deep", child)
                child_size, child_height = visit(child, depth + 1, place)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_VALUES:
                    refuse(where, f"aliases expand to more than {MAX_VALUES} values; write the values out", node)
            active.discard(key)
            done[key] = size, height
        size, height = done[key]
        if depth - 1 + height > MAX_DEPTH:
            refuse(where, f"nested deeper than {MAX_DEPTH} levels (aliases expanded); a config is a few levels "
                   f"deep", node)
        return size, height

    visit(root, 1, "")


def _mapping_children(node: MappingNode, where: str) -> list:
    """The key and value nodes of a mapping, its keys checked: text, each once (a merge `<<` is exempt)."""
    seen: dict[str, int] = {}
    children = []
    for key_node, value_node in node.value:
        if key_node.tag == MERGE:
            children.append((value_node, f"{where}.<<" if where else "<<"))
            continue
        if not isinstance(key_node, ScalarNode) or key_node.tag != STR:
            raise StrictYAMLError(None, None, f"{where or 'the top level'}: the key {_describe(key_node)} is not "
                                  f"text; keys are field names (quote it if you mean the text)", key_node.start_mark)
        name = key_node.value
        place = f"{where}.{name}" if where else name
        if name in seen:
            raise StrictYAMLError(None, None, f"{place}: duplicate key {name!r} (also on line {seen[name]}); keep "
                                  f"one of them", key_node.start_mark)
        seen[name] = key_node.start_mark.line + 1
        children += [(key_node, place), (value_node, place)]
    return children


def parse(text: str):
    """The value of the YAML document `text` (None for an empty one), under the rules of this module."""
    return yaml.load(text, Loader=StrictLoader)


def read_file(path: Path) -> str:
    """The text of a config file; ValueError(why) when it is missing, not a regular file, larger than
    MAX_BYTES, unreadable or not UTF-8 (the caller names the file)."""
    try:
        if not path.exists():
            raise ValueError("does not exist")
        if path.is_dir():
            raise ValueError("is a folder, not a file")
        if not path.is_file():
            raise ValueError("is not a regular file (a pipe or a device?)")
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ValueError(f"holds {size / 2**20:.1f} MiB, more than the {MAX_BYTES // 2**20} MiB a config file "
                             f"may hold; is it the right file?")
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
