"""Safe YAML loading that remembers where every key came from.

Plain `yaml.safe_load` silently keeps the last of two duplicate keys and
forgets line numbers. lab's error messages must name the line of a bad key,
so documents are composed into nodes (no object construction: tags beyond
the YAML core schema are never executed) and turned into plain data here,
recording the line of every key path on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]


class YamlError(ValueError):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


@dataclass
class LoadedYaml:
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the deepest known prefix of `path` (pydantic may point below a key)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None


def load(text: str) -> LoadedYaml:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlError(f"YAML syntax error: {problem}", line) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"YAML syntax error: {exc}", None) from None
    if node is None:
        return LoadedYaml(data=None)
    loaded = LoadedYaml(data=None)
    loaded.data = _Converter(loaded.lines).convert(node, ())
    return loaded


_constructor = yaml.SafeLoader("")
_MERGE_TAG = "tag:yaml.org,2002:merge"
# A lab.yaml has a few hundred values; aliases can multiply that (a "billion
# laughs" document), so conversion stops well before it could hang.
MAX_VALUES = 100_000


class _Converter:
    def __init__(self, lines: dict[KeyPath, int]) -> None:
        self.lines = lines
        self.count = 0
        self.open: set[int] = set()  # ids of the collections being converted, to spot recursive aliases

    def convert(self, node: yaml.Node, path: KeyPath) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise YamlError(f"document expands to more than {MAX_VALUES} values (aliases repeated too often)",
                            node.start_mark.line + 1)
        self.lines.setdefault(path, node.start_mark.line + 1)
        expected_tag = _COLLECTION_TAGS.get(type(node))
        if expected_tag and node.tag != expected_tag:
            raise _refused_tag(node)
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            return _scalar(node)
        if id(node) in self.open:
            raise YamlError("an alias refers to the mapping or list that contains it", node.start_mark.line + 1)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.convert(item, path + (index,)) for index, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError("mapping keys must be plain scalars", key_node.start_mark.line + 1)
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key = _scalar(key_node)
            if key in result:
                raise YamlError(f"duplicate key {dotted(path + (key,))!r} (first defined on line "
                                f"{self.lines[path + (key,)]})", key_node.start_mark.line + 1)
            self.lines[path + (key,)] = key_node.start_mark.line + 1
            result[key] = self.convert(value_node, path + (key,))
        if not merges:
            return result
        # Merge keys (<<) are legal YAML: keys written in the mapping win over
        # merged ones, and of `<<: [*a, *b]` the first mapping wins.
        merged: dict[Any, Any] = {}
        for value_node in merges:
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            if isinstance(value_node, yaml.SequenceNode) and value_node.tag != _COLLECTION_TAGS[yaml.SequenceNode]:
                raise _refused_tag(value_node)
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise YamlError("a merge key (<<) must name a mapping or a list of mappings",
                                    source.start_mark.line + 1)
                scratch: dict[KeyPath, int] = {}
                lines, self.lines = self.lines, scratch
                try:
                    data = self.convert(source, path)
                finally:
                    self.lines = lines
                for key, value in data.items():
                    if key in result or key in merged:
                        continue
                    merged[key] = value
                    for sub, line in scratch.items():
                        if sub[:len(path) + 1] == path + (key,):
                            self.lines.setdefault(sub, line)
        return {**merged, **result}


_COLLECTION_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map",
                    yaml.SequenceNode: "tag:yaml.org,2002:seq"}
# The YAML core schema: the only scalar types a lab.yaml needs.
_SCALAR_TAGS = {f"tag:yaml.org,2002:{name}" for name in
                ("str", "int", "float", "bool", "null", "timestamp")}


def dotted(path: KeyPath) -> str:
    """("nodes", "list", 0, "name") -> "nodes.list[0].name", as lab's messages spell key paths."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _refused_tag(node: yaml.Node) -> YamlError:
    # Any other tag (!!python/object, !custom) would construct objects: refuse it.
    return YamlError(f"YAML tag {node.tag!r} is not allowed (lab.yaml holds plain data only)",
                     node.start_mark.line + 1)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode) or node.tag not in _SCALAR_TAGS:
        raise _refused_tag(node)
    try:
        return _constructor.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise YamlError(f"cannot read value: {exc.problem}", node.start_mark.line + 1) from None
