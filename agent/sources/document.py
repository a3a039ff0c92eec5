"""Checking a Kubernetes-shaped document field by field (sans-IO), for the parsers of
AuthorizationPolicies and HTTPRoutes: every error names the object, the field's path and
the reason, because a document that silently means less than it says is a hole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


class DocumentError(ValueError):
    """A document refused: which object ("namespace/name"), which field, and why."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        self.key = key
        self.path = path
        self.reason = reason
        where = f"{key}: {path}" if path else key
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class Doc:
    """The object being parsed, so that every error can name it, as the parser's own kind
    of DocumentError."""

    key: str
    error_type: type[DocumentError] = DocumentError

    def error(self, path: str, reason: str) -> DocumentError:
        return self.error_type(self.key, path, reason)


def doc_for(
    namespace: object, name: object, error_type: type[DocumentError] = DocumentError
) -> Doc:
    # Known before anything is validated, so that even "name is missing" says which object.
    def part(value: object) -> str:
        return value if isinstance(value, str) and value else "?"

    return Doc(f"{part(namespace)}/{part(name)}", error_type)


def at(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def mapping(doc: Doc, value: object, path: str) -> Mapping[str, object]:
    """A mapping; null counts as an empty one (YAML writes `spec:` with nothing as null)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise doc.error(path, f"must be a mapping, not {type_name(value)}")
    return value


def check_keys(doc: Doc, value: Mapping[str, object], allowed: Iterable[str], path: str) -> None:
    allowed = tuple(allowed)
    for key in value:
        if key not in allowed:
            raise doc.error(
                at(path, str(key)), f"unknown field (expected one of: {', '.join(allowed)})"
            )


def list_of(doc: Doc, value: object, path: str, *, most: int | None = None) -> Sequence[object]:
    if value is None:
        return ()
    # A bare string would otherwise be iterated as characters.
    if not isinstance(value, list | tuple):
        raise doc.error(path, f"must be a list, not {type_name(value)}")
    if most is not None and len(value) > most:
        raise doc.error(path, f"has {len(value)} entries; at most {most} are allowed")
    return value


def string(doc: Doc, value: object, path: str, *, most: int | None = None) -> str:
    if value is None:
        raise doc.error(path, "is required")
    if not isinstance(value, str) or not value:
        raise doc.error(path, f"must be a non-empty string, not {value!r}")
    if most is not None and len(value) > most:
        raise doc.error(path, f"is {len(value)} characters long; at most {most} are allowed")
    return value


def items(
    doc: Doc, value: Mapping[str, object], key: str, path: str, *, most: int | None = None
) -> list[tuple[str, object]]:
    """The list under `key` as (path of the item, item)."""
    field_path = at(path, key)
    return [
        (f"{field_path}[{i}]", item)
        for i, item in enumerate(list_of(doc, value.get(key), field_path, most=most))
    ]


def opened(
    document: Mapping[str, object],
    error_type: type[DocumentError],
    *,
    api_versions: Sequence[str],
    kind: str,
    top_keys: Sequence[str],
    metadata_keys: Sequence[str],
) -> tuple[Doc, Mapping[str, object]]:
    """The object's Doc (named by its metadata, read before anything is checked, so that
    every error says which object) and its metadata, once apiVersion, kind and the keys of
    both levels are checked."""
    metadata = document.get("metadata")
    named = metadata if isinstance(metadata, Mapping) else {}
    doc = doc_for(named.get("namespace"), named.get("name"), error_type)
    check_keys(doc, document, top_keys, "")
    api_version = document.get("apiVersion")
    if api_version not in api_versions:
        raise doc.error("apiVersion", f"{api_version!r} must be one of: {', '.join(api_versions)}")
    if document.get("kind") != kind:
        raise doc.error("kind", f"{document.get('kind')!r} must be {kind}")
    checked = mapping(doc, metadata, "metadata")
    check_keys(doc, checked, metadata_keys, "metadata")
    return doc, checked
