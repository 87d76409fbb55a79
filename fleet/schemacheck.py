"""A JSON Schema (2020-12) validity check compiled to Python closures, once per schema.

jsonschema walks the schema anew for every value of the document, building a validator
and resolving every ``$ref`` as it goes: tens of microseconds a value, seconds for an
inventory of a thousand hosts, and as slow to say "valid" as to find what is wrong. This
module compiles the schema once into nested closures that answer only "valid or not",
keeping jsonschema's semantics keyword for keyword (bool is not a number, 1.0 is an
integer, ``pattern`` is ``re.search``, ``const`` and ``enum`` tell true from 1, a bound
lets NaN through).

Finding and wording an error stays jsonschema's job (``Schema.best_error``): its own
search, run only when the check says no, and then only into the values the check
refuses; a value the check accepts would have yielded no error, so the error found is
the one the whole search finds.

Only the keywords below are implemented; a schema using any other is refused when
compiled rather than half-checked.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

if TYPE_CHECKING:
    import jsonschema.exceptions

Predicate = Callable[[Any], bool]

# Annotations, and keywords read along with others (then/else by if, $defs by $ref).
_PASSIVE = frozenset(
    {"$schema", "$id", "$comment", "$defs", "title", "description", "default", "examples"}
    | {"then", "else"}
)
# The keywords that apply to values of one type only, by that type.
_BY_TYPE = {
    "string": frozenset({"pattern", "minLength", "maxLength"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "object": frozenset(
        {"properties", "required", "additionalProperties", "propertyNames", "minProperties"}
        | {"maxProperties"}
    ),
    "array": frozenset({"items", "minItems", "maxItems", "uniqueItems"}),
}
_ANY = frozenset({"type", "const", "enum", "$ref", "allOf", "anyOf", "oneOf", "not", "if"})
KEYWORDS = _PASSIVE.union(_ANY, *_BY_TYPE.values())


class UnsupportedSchema(ValueError):
    """The schema uses what this module does not implement."""


class Schema:
    """A schema compiled once: its validity check, and its error search."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self._root = root
        self._compiler = _Compiler(root)
        self.is_valid: Predicate = self._compiler.node(root)
        self._search: Any = None  # jsonschema's validator: built for the first invalid value

    def best_error(self, instance: Any) -> jsonschema.exceptions.ValidationError | None:
        """jsonschema's best match among the errors, or None for a valid instance.

        jsonschema is imported here, not with the module: a valid document never needs it,
        and it is the heaviest import a command would otherwise pay for at its start.
        """
        if self.is_valid(instance):
            return None
        import jsonschema.exceptions

        if self._search is None:
            self._search = _pruned(self._compiler)(self._root)
        error: jsonschema.exceptions.ValidationError | None = jsonschema.exceptions.best_match(
            self._search.iter_errors(instance)
        )
        return error


def compile_schema(root: Any) -> Predicate:
    """A predicate telling whether a value is valid under ``root``.

    Its ``$ref`` are JSON pointers into ``root`` itself (``#/$defs/...``).
    """
    return _Compiler(root).node(root)


def _always(_value: Any) -> bool:
    return True


def _never(_value: Any) -> bool:
    return False


def _is_number(value: Any) -> bool:
    kind = type(value)
    if kind is int or kind is float:
        return True
    return kind is not bool and isinstance(value, numbers.Number)


def _is_integer(value: Any) -> bool:
    kind = type(value)
    if kind is int:
        return True
    if kind is bool:
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


_TYPES: dict[str, Predicate] = {
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "number": _is_number,
    "integer": _is_integer,
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _unbool(value: Any, true: object = object(), false: object = object()) -> Any:
    if value is True:
        return true
    if value is False:
        return false
    return value


def _equal(one: Any, two: Any) -> bool:
    """JSON equality as jsonschema has it: true is not 1, 1.0 is 1."""
    if one is two:
        return True
    if isinstance(one, str) or isinstance(two, str):
        return bool(one == two)
    if isinstance(one, Sequence) and isinstance(two, Sequence):
        return len(one) == len(two) and all(_equal(i, j) for i, j in zip(one, two, strict=True))
    if isinstance(one, Mapping) and isinstance(two, Mapping):
        return len(one) == len(two) and all(
            key in two and _equal(value, two[key]) for key, value in one.items()
        )
    return bool(_unbool(one) == _unbool(two))


def _unique(items: list[Any]) -> bool:
    if all(type(item) is str for item in items):
        return len(set(items)) == len(items)
    seen: list[Any] = []
    for item in items:
        if any(_equal(other, item) for other in seen):
            return False
        seen.append(item)
    return True


def _all(predicates: Sequence[Predicate]) -> Predicate:
    if not predicates:
        return _always
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        first, second = predicates
        return lambda v: first(v) and second(v)
    chain = tuple(predicates)

    def every(value: Any) -> bool:
        return all(predicate(value) for predicate in chain)

    return every


def _any(predicates: Sequence[Predicate]) -> Predicate:
    chain = tuple(predicates)

    def some(value: Any) -> bool:
        return any(predicate(value) for predicate in chain)

    return some


def _one(predicates: Sequence[Predicate]) -> Predicate:
    chain = tuple(predicates)

    def exactly_one(value: Any) -> bool:
        found = False
        for predicate in chain:
            if predicate(value):
                if found:
                    return False
                found = True
        return found

    return exactly_one


def _pointer(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        raise UnsupportedSchema(f"$ref {ref!r}: only references into the schema itself")
    target = root
    fragment = unquote(ref[1:])
    for token in fragment.split("/")[1:] if fragment else ():
        key = token.replace("~1", "/").replace("~0", "~")
        try:
            target = target[int(key)] if isinstance(target, list) else target[key]
        except (KeyError, IndexError, ValueError) as exc:
            raise UnsupportedSchema(f"$ref {ref!r} points nowhere") from exc
    return target


class _Compiler:
    """Each maker of one type's keywords takes ``strict``: whether a value of another
    type fails (the schema says ``type``) or passes (it does not)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, Predicate] = {}
        # By the identity of a subschema of root, which the error search asks for again.
        self.nodes: dict[int, tuple[Any, Predicate]] = {}

    def ref(self, ref: str) -> Predicate:
        """Each target compiled once; a reference back into itself waits for it."""
        if ref not in self.refs:
            done: list[Predicate] = []
            self.refs[ref] = lambda v: done[0](v)
            done.append(self.node(_pointer(self.root, ref)))
            self.refs[ref] = done[0]
        return self.refs[ref]

    def node(self, schema: Any) -> Predicate:
        if schema is True:
            return _always
        if schema is False:
            return _never
        known = self.nodes.get(id(schema))
        if known is not None:
            return known[1]
        predicate = self.compile(schema)
        self.nodes[id(schema)] = (schema, predicate)
        return predicate

    def compile(self, schema: Any) -> Predicate:
        if not isinstance(schema, dict):
            raise UnsupportedSchema(f"not a schema: {schema!r}")
        unknown = schema.keys() - KEYWORDS
        if unknown:
            raise UnsupportedSchema(f"keywords not implemented: {', '.join(sorted(unknown))}")
        types = schema.get("type")
        if isinstance(types, str):
            types = [types]
        if types is not None and not set(types) <= _TYPES.keys():
            raise UnsupportedSchema(f"unknown type in {types!r}")
        sole = types[0] if types is not None and len(types) == 1 else None
        predicates: list[Predicate] = []
        if sole is not None:
            kind = "number" if sole == "integer" else sole
            if kind in _BY_TYPE and not _BY_TYPE[kind].isdisjoint(schema):
                predicates.append(self.typed(kind, schema, _TYPES[sole], strict=True))
            else:
                predicates.append(_TYPES[sole])
        else:
            if types is not None:
                predicates.append(_any([_TYPES[t] for t in types]))
            for kind, keywords in _BY_TYPE.items():
                if not keywords.isdisjoint(schema):
                    predicates.append(self.typed(kind, schema, _TYPES[kind], strict=False))
        predicates.extend(self.general(schema))
        return _all(predicates)

    def typed(
        self, kind: str, schema: Mapping[str, Any], test: Predicate, strict: bool
    ) -> Predicate:
        if kind == "string":
            return self.string(schema, strict)
        if kind == "number":
            return self.number(schema, test, strict)
        if kind == "object":
            return self.object(schema, strict)
        return self.array(schema, strict)

    def string(self, schema: Mapping[str, Any], strict: bool) -> Predicate:
        lenient = not strict
        search = re.compile(schema["pattern"]).search if "pattern" in schema else None
        least: int = schema.get("minLength", 0)
        most: int | None = schema.get("maxLength")
        if search is not None and least == 0 and most is None:
            return lambda v: search(v) is not None if isinstance(v, str) else lenient

        def check(value: Any) -> bool:
            if not isinstance(value, str):
                return lenient
            if len(value) < least or (most is not None and len(value) > most):
                return False
            return search is None or search(value) is not None

        return check

    def number(self, schema: Mapping[str, Any], test: Predicate, strict: bool) -> Predicate:
        # Comparisons as jsonschema writes them, so that NaN passes the same bounds.
        lenient = not strict
        low = schema.get("minimum")
        high = schema.get("maximum")
        above = schema.get("exclusiveMinimum")
        below = schema.get("exclusiveMaximum")

        def check(value: Any) -> bool:
            if not test(value):
                return lenient
            if low is not None and value < low:
                return False
            if high is not None and value > high:
                return False
            if above is not None and value <= above:
                return False
            return below is None or not value >= below

        return check

    def object(self, schema: Mapping[str, Any], strict: bool) -> Predicate:
        lenient = not strict
        properties = {k: self.node(s) for k, s in schema.get("properties", {}).items()}
        extra = schema.get("additionalProperties", True)
        additional = None if extra is True else self.node(extra)
        names = self.node(schema["propertyNames"]) if "propertyNames" in schema else None
        required = frozenset(schema.get("required", ()))
        least: int = schema.get("minProperties", 0)
        most: int | None = schema.get("maxProperties")
        simple = additional is None and names is None and least == 0 and most is None
        if simple and not properties:
            return lambda v: v.keys() >= required if isinstance(v, dict) else lenient
        if simple and not required and len(properties) == 1:
            # An `if` on one property: as cheap as a lookup.
            [(key, predicate)] = properties.items()
            return lambda v: key not in v or predicate(v[key]) if isinstance(v, dict) else lenient

        def check(value: Any) -> bool:
            if not isinstance(value, dict):
                return lenient
            if len(value) < least or (most is not None and len(value) > most):
                return False
            if required and not value.keys() >= required:
                return False
            for key, item in value.items():
                predicate = properties.get(key, additional)
                if predicate is not None and not predicate(item):
                    return False
                if names is not None and not names(key):
                    return False
            return True

        return check

    def array(self, schema: Mapping[str, Any], strict: bool) -> Predicate:
        lenient = not strict
        item = self.node(schema["items"]) if "items" in schema else None
        least: int = schema.get("minItems", 0)
        most: int | None = schema.get("maxItems")
        unique = bool(schema.get("uniqueItems", False))

        def check(value: Any) -> bool:
            if not isinstance(value, list):
                return lenient
            if len(value) < least or (most is not None and len(value) > most):
                return False
            if unique and not _unique(value):
                return False
            if item is not None:
                for each in value:
                    if not item(each):
                        return False
            return True

        return check

    def general(self, schema: Mapping[str, Any]) -> list[Predicate]:
        """The keywords that apply to a value of any type."""
        predicates: list[Predicate] = []
        if "const" in schema:
            const = schema["const"]
            if isinstance(const, str):
                predicates.append(lambda v: v == const if isinstance(v, str) else _equal(v, const))
            else:
                predicates.append(lambda v: _equal(v, const))
        if "enum" in schema:
            values = list(schema["enum"])
            if all(isinstance(e, str) for e in values):
                strings = frozenset(values)
                predicates.append(
                    lambda v: (
                        v in strings if isinstance(v, str) else any(_equal(v, e) for e in values)
                    )
                )
            else:
                predicates.append(lambda v: any(_equal(v, e) for e in values))
        if "$ref" in schema:
            predicates.append(self.ref(schema["$ref"]))
        if "allOf" in schema:
            predicates.append(_all([self.node(s) for s in schema["allOf"]]))
        if "anyOf" in schema:
            predicates.append(_any([self.node(s) for s in schema["anyOf"]]))
        if "oneOf" in schema:
            predicates.append(_one([self.node(s) for s in schema["oneOf"]]))
        if "not" in schema:
            negated = self.node(schema["not"])
            predicates.append(lambda v: not negated(v))
        if "if" in schema:
            condition = self.node(schema["if"])
            then = self.node(schema.get("then", True))
            otherwise = self.node(schema.get("else", True))
            predicates.append(lambda v: then(v) if condition(v) else otherwise(v))
        return predicates


def _pruned(compiler: _Compiler) -> Any:
    """jsonschema's validator, descending only into the values the check refuses.

    The keywords that descend into an object's values or an array's items are
    jsonschema's own, given the refused ones only; array indices are kept.
    """
    import jsonschema.validators

    base = jsonschema.validators.Draft202012Validator
    original = base.VALIDATORS

    def refused(subschemas: Mapping[str, Any], instance: dict[str, Any]) -> dict[str, Any]:
        return {
            key: value
            for key, value in instance.items()
            if key not in subschemas or not compiler.node(subschemas[key])(value)
        }

    def properties(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict) and isinstance(value, dict):
            instance = refused(value, instance)
        yield from original["properties"](validator, value, instance, schema)

    def additional(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict) and isinstance(value, dict):
            check = compiler.node(value)
            named = schema.get("properties", {})
            instance = {k: v for k, v in instance.items() if k in named or not check(v)}
        yield from original["additionalProperties"](validator, value, instance, schema)

    def names(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            check = compiler.node(value)
            instance = {k: v for k, v in instance.items() if not check(k)}
        yield from original["propertyNames"](validator, value, instance, schema)

    def items(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if value is False or "prefixItems" in schema or not isinstance(instance, list):
            yield from original["items"](validator, value, instance, schema)
            return
        check = compiler.node(value)
        for index, item in enumerate(instance):
            if not check(item):
                yield from validator.descend(instance=item, schema=value, path=index)

    # Untyped in jsonschema's stubs.
    extend = cast("Callable[..., Any]", jsonschema.validators.extend)
    return extend(
        base,
        {
            "properties": properties,
            "additionalProperties": additional,
            "propertyNames": names,
            "items": items,
        },
    )
