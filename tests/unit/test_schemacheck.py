"""The compiled check says what jsonschema says, and the pruned error search finds the
error the whole search finds: over many broken inventories, and keyword by keyword."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import Any

import jsonschema
import jsonschema.exceptions
import pytest

from fleet import schemacheck
from fleet.inventory import schema
from tests.unit.generated import inventory_document
from tests.unit.test_inventory import EXAMPLE, balanced, watched

# Values a broken producer could put anywhere: wrong types, bools for numbers, bounds,
# strings each pattern refuses.
POOL: list[Any] = [
    None, True, False, 0, 1, 1.0, 2.5, -1, 599, 70000, float("nan"), "", "x", "x\n", "-x",
    "http", "tcp", "command", "/", "/health", "25%", "150%", "192.0.2.1", "2001:db8::1",
    "a.example.org", "ssh-ed25519 AAAA", [], ["a"], ["a", "a"], [1, True], [1, 1.0], {},
    {"a": 1},
]  # fmt: skip
KEYS = ["colour", "port", "path", "command", "expectStatus", "expectBody", "secrets", "check"]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


def _mutated(document: Any, rng: random.Random) -> Any:
    data = copy.deepcopy(document)
    for _ in range(rng.randint(1, 2)):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent, key = _at(data, path[:-1]), path[-1]
        target = parent[key]
        operation = rng.choice(["replace", "replace", "delete", "add"])
        if operation == "replace":
            parent[key] = copy.deepcopy(rng.choice(POOL))
        elif operation == "delete":
            del parent[key]
        elif isinstance(target, dict):
            target[rng.choice(KEYS)] = copy.deepcopy(rng.choice(POOL))
        elif isinstance(target, list):
            target.append(copy.deepcopy(rng.choice(target or POOL)))
    return data


def _small(seed: int) -> dict[str, Any]:
    return inventory_document(3, services=6, per_host=2, seed=seed)


BASES = {
    "example": lambda: EXAMPLE,
    "balanced": balanced,
    "watched": watched,
    **{f"generated-{seed}": lambda seed=seed: _small(seed) for seed in range(3)},
}


def _agree(root: Any, data: Any, compiled: schemacheck.Schema | None = None) -> None:
    compiled = compiled or schemacheck.Schema(root)
    validator = jsonschema.Draft202012Validator(root)
    assert compiled.is_valid(data) == validator.is_valid(data), data
    expected = jsonschema.exceptions.best_match(validator.iter_errors(data))
    found = compiled.best_error(data)
    if expected is None:
        assert found is None
    else:
        assert found is not None, data
        assert (list(found.absolute_path), found.message) == (
            list(expected.absolute_path),
            expected.message,
        )


@pytest.mark.parametrize("base", list(BASES))
def test_broken_inventories_are_judged_as_jsonschema_judges_them(base: str) -> None:
    document, compiled = BASES[base](), schemacheck.Schema(schema())
    _agree(schema(), document, compiled)
    rng = random.Random(base)
    for _ in range(150):
        _agree(schema(), _mutated(document, rng), compiled)


def test_broken_checks_are_judged_as_jsonschema_judges_them() -> None:
    root = {"$ref": "#/$defs/check", "$defs": schema()["$defs"]}
    checks = [c for h in _small(0)["hosts"].values() for c in h["checks"]]
    checks += [c for h in EXAMPLE["hosts"].values() for c in h["checks"]]
    rng, compiled = random.Random(0), schemacheck.Schema(root)
    for check in checks:
        _agree(root, check, compiled)
        for _ in range(20):
            _agree(root, _mutated({"check": check}, rng).get("check"), compiled)


@pytest.mark.parametrize(
    ("root", "instance"),
    [
        ({"type": "integer"}, True),
        ({"type": "integer"}, 1.0),
        ({"type": "integer"}, 1.5),
        ({"type": "number"}, False),
        ({"type": ["string", "null"]}, None),
        ({"type": ["string", "null"]}, 0),
        ({"minimum": 1}, float("nan")),
        ({"minimum": 1}, "0"),
        ({"type": "number", "exclusiveMinimum": 0}, 0),
        ({"maximum": 3, "exclusiveMaximum": 3}, 3),
        ({"const": 1}, True),
        ({"const": 1}, 1.0),
        ({"const": "a"}, ["a"]),
        ({"enum": ["a", 1]}, True),
        ({"enum": ["a", "b"]}, "b"),
        ({"uniqueItems": True}, [1, True]),
        ({"uniqueItems": True}, [1, 1.0]),
        ({"uniqueItems": True}, [{"a": [1]}, {"a": [1.0]}]),
        ({"minLength": 2, "maxLength": 2}, "ab"),
        ({"pattern": "^a"}, 1),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 1),
        ({"not": {"required": ["a"]}}, {"a": 1}),
        ({"if": {"const": 1}, "then": False, "else": {"type": "string"}}, 2),
        ({"properties": {"a": False}, "minProperties": 1}, {"b": 1}),
        ({"additionalProperties": {"type": "integer"}, "maxProperties": 1}, {"b": 1.0}),
        ({"propertyNames": {"pattern": "^[a-z]+$"}}, {"B": 1}),
        ({"items": {"type": "string"}, "minItems": 1}, []),
        ({"$defs": {"tree": {"type": "array", "items": {"$ref": "#/$defs/tree"}}},
          "$ref": "#/$defs/tree"}, [[[]], [[], [1]]]),
    ],
)  # fmt: skip
def test_keywords_as_jsonschema_has_them(root: dict[str, Any], instance: Any) -> None:
    _agree(root, instance)


@pytest.mark.parametrize(
    "root",
    [{"patternProperties": {}}, {"$ref": "other.json#/a"}, {"$ref": "#/$defs/none"}],
)
def test_what_is_not_implemented_is_refused(root: dict[str, Any]) -> None:
    with pytest.raises(schemacheck.UnsupportedSchema):
        schemacheck.compile_schema(root)
