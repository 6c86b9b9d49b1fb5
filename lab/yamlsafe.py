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
    loaded.data = _convert(node, (), loaded.lines)
    return loaded


_constructor = yaml.SafeLoader("")


def _convert(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    expected_tag = _COLLECTION_TAGS.get(type(node))
    if expected_tag and node.tag != expected_tag:
        raise _refused_tag(node)
    if isinstance(node, yaml.MappingNode):
        if any(key.tag == "tag:yaml.org,2002:merge" for key, _ in node.value):
            # Merge keys (<<) are legal YAML; let the safe constructor flatten them.
            _constructor.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError("mapping keys must be plain scalars", key_node.start_mark.line + 1)
            key = _scalar(key_node)
            if key in result:
                where = ".".join(str(p) for p in path + (key,))
                raise YamlError(f"duplicate key {where!r} (first defined on line "
                                f"{lines[path + (key,)]})", key_node.start_mark.line + 1)
            lines[path + (key,)] = key_node.start_mark.line + 1
            result[key] = _convert(value_node, path + (key,), lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, path + (index,), lines) for index, item in enumerate(node.value)]
    return _scalar(node)


_COLLECTION_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map",
                    yaml.SequenceNode: "tag:yaml.org,2002:seq"}
# The YAML core schema: the only scalar types a lab.yaml needs.
_SCALAR_TAGS = {f"tag:yaml.org,2002:{name}" for name in
                ("str", "int", "float", "bool", "null", "timestamp")}


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
