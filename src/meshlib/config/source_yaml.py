"""Load YAML or JSON while remembering the line of every field.

Errors must name the file, line and field path, so the document is composed
into nodes first and each node's line is recorded under its field path.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from meshlib.errors import PolicyIssue

Path = tuple[str | int, ...]


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so keys such as
    ``on`` (retry conditions) and values such as ``off`` stay strings."""


_PolicyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_PolicyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


class LocatedDocument:
    """Parsed data plus the 1-based line of each field path."""

    def __init__(self, data: Any, lines: dict[Path, int], file: str) -> None:
        self.data = data
        self.lines = lines
        self.file = file

    def line_of(self, path: Path) -> int | None:
        """Line of the path, or of its nearest ancestor that exists in the file."""
        probe = tuple(path)
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            probe = probe[:-1]
        return self.lines.get((), None)

    def issue(self, path: Path, message: str) -> PolicyIssue:
        return PolicyIssue(format_path(path), message, self.file, self.line_of(path))


def format_path(path: Path) -> str:
    """``services.users.routes[0].to[1]`` style."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_document(text: str, file: str = "<policy>") -> LocatedDocument:
    """Parse text; raise a ConfigError-ready list of issues via ValueError subclass."""
    loader = _PolicyLoader(text)
    lines: dict[Path, int] = {}
    duplicates: list[PolicyIssue] = []
    try:
        root = loader.get_single_node()
        if root is None:
            return LocatedDocument({}, {(): 1}, file)

        def build(node: yaml.Node, path: Path) -> Any:
            lines[path] = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                loader.flatten_mapping(node)
                result: dict[Any, Any] = {}
                for key_node, value_node in node.value:
                    key = loader.construct_object(key_node, deep=True)
                    if not isinstance(key, str | int | float | bool):
                        duplicates.append(
                            PolicyIssue(
                                format_path(path),
                                "mapping keys must be plain scalars",
                                file,
                                key_node.start_mark.line + 1,
                            )
                        )
                        continue
                    key = str(key) if not isinstance(key, str) else key
                    if key in result:
                        duplicates.append(
                            PolicyIssue(
                                format_path((*path, key)),
                                "duplicate key",
                                file,
                                key_node.start_mark.line + 1,
                            )
                        )
                    result[key] = build(value_node, (*path, key))
                return result
            if isinstance(node, yaml.SequenceNode):
                return [build(item, (*path, index)) for index, item in enumerate(node.value)]
            return loader.construct_object(node, deep=True)

        data = build(root, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise DocumentError(
            [PolicyIssue("", f"not valid YAML/JSON: {exc.problem or exc}", file, line)]
        ) from None
    except yaml.YAMLError as exc:
        raise DocumentError([PolicyIssue("", f"not valid YAML/JSON: {exc}", file, None)]) from None
    finally:
        loader.dispose()
    if duplicates:
        raise DocumentError(duplicates)
    return LocatedDocument(data, lines, file)


class DocumentError(ValueError):
    """The text could not be parsed; carries the issues."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = issues
        super().__init__("; ".join(str(issue) for issue in issues))
