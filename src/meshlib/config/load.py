"""Turn policy text or mappings into a validated MeshConfig, or every problem at once."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path as FilePath
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from meshlib.config.model import MeshConfig
from meshlib.config.references import check_references
from meshlib.config.source_yaml import DocumentError, LocatedDocument, Path, load_document
from meshlib.errors import ConfigError, PolicyIssue

M = TypeVar("M", bound=BaseModel)


def load_policy_file(path: str | FilePath) -> MeshConfig:
    """Read and validate a policy file (YAML or JSON)."""
    file = str(path)
    try:
        text = FilePath(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [PolicyIssue("", f"cannot read policy file: {exc.strerror}", file)]
        ) from None
    return parse_policy(text, file)


def parse_policy(text: str, file: str = "<policy>") -> MeshConfig:
    try:
        document = load_document(text, file)
    except DocumentError as exc:
        raise ConfigError(exc.issues) from None
    return validate_document(document)


def policy_from_mapping(data: Mapping[str, Any] | MeshConfig, source: str = "<dict>") -> MeshConfig:
    if isinstance(data, MeshConfig):
        issues = check_references(data, LocatedDocument({}, {}, source))
        if issues:
            raise ConfigError(issues)
        return data
    return validate_document(LocatedDocument(dict(data), {}, source))


def validate_model(model: type[M], document: LocatedDocument) -> M:
    """Validate a located document against a model; ConfigError lists every problem."""
    if not isinstance(document.data, dict):
        raise ConfigError([document.issue((), "the document must be a mapping at the top level")])
    try:
        return model.model_validate(document.data)
    except ValidationError as exc:
        raise ConfigError(_issues_from(exc, document, model)) from None


def validate_document(document: LocatedDocument) -> MeshConfig:
    config = validate_model(MeshConfig, document)
    issues = check_references(config, document)
    if issues:
        raise ConfigError(issues)
    return config


def _issues_from(
    error: ValidationError, document: LocatedDocument, root: type[BaseModel]
) -> list[PolicyIssue]:
    issues = []
    items = error.errors()
    # for `mapping | "off"` fields, the mapping's errors say more than "should be 'off'"
    literal_only = {
        tuple(str(p) for p in item["loc"][:-1])
        for item in items
        if item["loc"] and str(item["loc"][-1]).startswith("literal[")
    }
    other = {
        tuple(str(p) for p in item["loc"][: len(prefix)])
        for item in items
        for prefix in literal_only
        if not any(str(p).startswith("literal[") for p in item["loc"])
    }
    items = [
        item
        for item in items
        if not (
            item["loc"]
            and str(item["loc"][-1]).startswith("literal[")
            and tuple(str(p) for p in item["loc"][:-1]) in other
        )
    ]
    error_paths: dict[Path, list[str]] = {}
    for item in error.errors():
        key = _data_path(document.data, item["loc"])
        error_paths.setdefault(key, []).extend(str(p) for p in item["loc"])
    for item in items:
        path = _data_path(document.data, item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, path[:-1])
            message = f"unknown key {path[-1]!r}"
            if allowed:
                message += f" (allowed here: {', '.join(allowed)})"
        elif item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] in ("model_type", "model_attributes_type", "dict_type"):
            message = f"expected a mapping, got {type(item['input']).__name__} {item['input']!r}"
            siblings = error_paths.get(path, [])
            if any(part.startswith("literal[") for part in siblings):
                message += " (or the word off)"
        issues.append(document.issue(path, message))
    return issues


def _data_path(data: Any, loc: tuple[int | str, ...]) -> Path:
    """Keep the parts of a pydantic location that index the document; drop validator tags."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if _indexes(node, part):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and not _is_tag(part):
            path.append(part)  # a missing or extra key: name it, then stop descending
            node = None
    return tuple(path)


def _indexes(node: Any, part: int | str) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _is_tag(part: str) -> bool:
    """Union member labels pydantic puts in locations (``FaultsConfig``, ``literal['off']``)."""
    scalar_tags = {"str", "int", "float", "bool", "dict", "list"}
    return "[" in part or part[:1].isupper() or part in scalar_tags


def _allowed_keys(root: type[BaseModel], path: Path) -> list[str]:
    """Field names of the model at a document path, for unknown-key messages."""
    model: Any = root
    for part in path:
        model = _field_type(model, part)
        if model is None:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return []


def _field_type(model: Any, part: str | int) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel):
        if not isinstance(part, str) or part not in model.model_fields:
            return None
        return _unwrap(model.model_fields[part].annotation)
    origin = typing.get_origin(model)
    args = typing.get_args(model)
    if origin is dict and len(args) == 2:
        return _unwrap(args[1])
    if origin is list and args:
        return _unwrap(args[0])
    return None


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / Annotated[X, ...] → X, the model part of a union."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
            models = [arg for arg in args if isinstance(arg, type) and issubclass(arg, BaseModel)]
            annotation = models[0] if models else args[0]
            continue
        return annotation
