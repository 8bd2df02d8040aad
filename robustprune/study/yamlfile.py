"""Reading a study file (or a --set value) as YAML with bounds: a study is a few kilobytes of
settings, so anything far bigger is a mistake or an attack (an alias bomb, deep nesting, a
5000-digit number) and is refused with the line it is on, before it can hang or exhaust memory."""

from __future__ import annotations

from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from robustprune.errors import excerpt
from robustprune.settings import MAX_INT

MAX_FILE_BYTES = 1_000_000  # a study file; the largest in studies/ is ~20 kB
MAX_VALUES = 100_000  # YAML values after expanding every alias (an alias bomb expands to billions)
MAX_DEPTH = 50  # nesting of mappings and lists (studies nest about 6 deep)
MERGE_TAG = "tag:yaml.org,2002:merge"


class StudyYAMLError(yaml.YAMLError):
    """A study file over a limit, or with a duplicate key: the message is the whole sentence's middle."""


def _line(node_or_mark) -> int:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return mark.line + 1


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, deep nesting, huge alias expansion and huge integers."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        # Composing recurses once per level: stop long before Python's recursion limit.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise StudyYAMLError(
                    f"line {_line(self.peek_event().start_mark)}: nesting is deeper than {MAX_DEPTH} levels; "
                    "a study nests a few levels, so flatten it"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        check_tree(node, self)
        return super().construct_document(node)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if len(text) > 100:  # (int() of thousands of digits is slow, and refused past 4300)
            value = None
        else:
            value = super().construct_yaml_int(node)
        if value is None or not -MAX_INT <= value < MAX_INT:
            raise StudyYAMLError(
                f"line {_line(node)}: the integer {excerpt(text, 40)} is out of range; "
                f"integers must lie between -2**63 and 2**63 - 1"
            )
        return value


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def check_tree(root: Node, loader: yaml.SafeLoader) -> None:
    """Refuse duplicate keys, and a tree that expands (aliases counted each time they are used)
    to more than MAX_VALUES values or MAX_DEPTH levels. Iterative, and linear in the file: each
    node is visited once, a shared node's size is remembered."""
    size: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    open_nodes: set[int] = set()
    stack: list[tuple[Node, str, bool]] = [(root, "", False)]
    while stack:
        node, where, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = _children(node)
            n = 1 + sum(size[id(k)][0] for k in kids)
            d = 1 + max((size[id(k)][1] for k in kids), default=0)
            size[key] = (min(n, MAX_VALUES + 1), min(d, MAX_DEPTH + 1))
            open_nodes.discard(key)
            if n > MAX_VALUES:
                raise StudyYAMLError(
                    f"the document expands to more than {MAX_VALUES} values (anchors and aliases count each "
                    f"time they are used, here near line {_line(node)}); a study needs far fewer, so remove "
                    "the aliases that multiply it"
                )
            if d > MAX_DEPTH:
                raise StudyYAMLError(
                    f"line {_line(node)}: aliases nest the document deeper than {MAX_DEPTH} levels; "
                    "a study nests a few levels, so flatten it"
                )
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise StudyYAMLError(f"line {_line(node)}: an alias refers to the list or mapping that contains it")
        open_nodes.add(key)
        stack.append((node, where, True))
        if isinstance(node, MappingNode):
            _no_duplicate_keys(node, where, loader)
            for k, v in node.value:
                label = f"{where}.{k.value}" if where else str(k.value)
                stack += [(v, label if isinstance(k, ScalarNode) else where, False), (k, where, False)]
        elif isinstance(node, SequenceNode):
            stack += [(v, f"{where}[{i}]", False) for i, v in enumerate(node.value)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _no_duplicate_keys(node: MappingNode, where: str, loader: yaml.SafeLoader) -> None:
    """YAML lets the last of two equal keys win in silence; a study file names each setting once."""
    seen: dict = {}
    for k, _ in node.value:
        if not isinstance(k, ScalarNode) or k.tag == MERGE_TAG:  # merged keys may be overridden on purpose
            continue
        value = loader.construct_object(k)
        try:
            first = seen.setdefault(value, k)
        except TypeError:  # (an unhashable key is SafeLoader's own error, later)
            continue
        if first is not k:
            inside = f" in '{where}'" if where else ""
            raise StudyYAMLError(
                f"key '{excerpt(str(value), 40)}' appears twice{inside} (lines {_line(first)} and {_line(k)}); "
                "keep one, since YAML would silently use the last"
            )


def load_yaml(text: str):
    """The YAML document in `text`, read within the limits above."""
    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (a SafeLoader)


def read_study_text(path: Path) -> str:
    """The text of a study file, read no further than the size limit (a huge or endless file is refused)."""
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise StudyYAMLError(
            f"is larger than {MAX_FILE_BYTES // 1_000_000} MB; a study file holds settings (a few kB), "
            "so check that this is the right file"
        )
    return data.decode("utf-8")
