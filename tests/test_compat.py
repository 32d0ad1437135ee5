"""The compatibility checker against cases written from the Avro specification.

Each case is a pair of schemas (A, B) with the expected answer in both directions: can B read
data written with A, and can A read data written with B. Source: Avro specification, "Schema
Resolution" (and "Logical Types" for decimal); Confluent Schema Registry compatibility types.
"""

from __future__ import annotations

from typing import Any

import pytest
from auditpipe.schemas import compat
from auditpipe.schemas.compat import Mode, SchemaError, check, parse, reader_incompatibilities


def rec(*fields: dict[str, Any], name: str = "R", **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


def f(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


def field_of(type_: Any) -> dict[str, Any]:
    """Wrap a type in a one-field record so that messages carry a path."""
    return rec(f("x", type_))


def enum(*symbols: str, name: str = "E", **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": name, "symbols": list(symbols), **extra}


def fixed(size: int, name: str = "F", **extra: Any) -> dict[str, Any]:
    return {"type": "fixed", "name": name, "size": size, **extra}


def decimal(precision: int, scale: int, base: str = "bytes") -> dict[str, Any]:
    return {"type": base, "logicalType": "decimal", "precision": precision, "scale": scale}


def long_list(value_type: str = "long", *more: dict[str, Any]) -> dict[str, Any]:
    return rec(f("value", value_type), f("next", ["null", "LongList"]), *more, name="LongList")


# (id, A, B, B reads A's data, A reads B's data, fragment expected in the failing direction(s):
# one string for both, or a pair (B reads A, A reads B))
CASES: list[tuple[str, Any, Any, bool, bool, str | tuple[str, str]]] = [
    # primitives: same type, and the promotions int->long/float/double, long->float/double,
    # float->double, string<->bytes
    ("int-int", "int", "int", True, True, ""),
    ("null-null", "null", "null", True, True, ""),
    ("int-long", field_of("int"), field_of("long"), True, False,
     "R.x: type long cannot be read as int"),
    ("int-float", "int", "float", True, False, "type float cannot be read as int"),
    ("int-double", "int", "double", True, False, "type double cannot be read as int"),
    ("long-float", "long", "float", True, False, "type float cannot be read as long"),
    ("long-double", "long", "double", True, False, "type double cannot be read as long"),
    ("float-double", "float", "double", True, False, "type double cannot be read as float"),
    ("string-bytes", "string", "bytes", True, True, ""),
    ("int-string", "int", "string", False, False,
     ("type int cannot be read as string",
      "type string cannot be read as int")),
    ("boolean-int", "boolean", "int", False, False,
     ("type boolean cannot be read as int",
      "type int cannot be read as boolean")),
    ("double-float", "double", "float", False, True, "type double cannot be read as float"),
    # records: fields matched by name; writer-only fields skipped; reader-only fields need a
    # default
    ("record-same", rec(f("a", "int")), rec(f("a", "int")), True, True, ""),
    ("record-reordered", rec(f("a", "int"), f("b", "string")),
     rec(f("b", "string"), f("a", "int")), True, True, ""),
    ("record-add-with-default", rec(f("a", "int")),
     rec(f("a", "int"), f("b", "string", default="")), True, True, ""),
    ("record-add-without-default", rec(f("a", "int")), rec(f("a", "int"), f("b", "string")),
     False, True, "R.b: reader field has no default"),
    ("record-nested-field-narrowed", rec(f("u", rec(f("n", "long"), name="U"))),
     rec(f("u", rec(f("n", "int"), name="U"))), False, True,
     "R.u.n: type long cannot be read as int"),
    ("record-name-differs", rec(f("a", "int")), rec(f("a", "int"), name="S"), False, False,
     ("record name R does not match S", "record name S does not match R")),
    ("record-namespace-differs", rec(f("a", "int"), namespace="x"),
     rec(f("a", "int"), namespace="y"), True, True, ""),
    ("record-renamed-with-alias", rec(f("a", "int")),
     rec(f("a", "int"), name="S", aliases=["R"]), True, False, "record name S does not match R"),
    # field aliases: the reader's aliases map a writer field name to the reader's
    ("field-renamed-with-alias", rec(f("old", "int")), rec(f("new", "int", aliases=["old"])),
     True, False, "R.old: reader field has no default"),
    ("field-renamed-without-alias", rec(f("old", "int")), rec(f("new", "int")), False, False,
     ("R.new: reader field has no default", "R.old: reader field has no default")),
    # enums: writer symbols must be reader symbols unless the reader has a default
    ("enum-same", enum("A", "B"), enum("A", "B"), True, True, ""),
    ("enum-symbol-added", enum("A", "B"), enum("A", "B", "C"), True, False,
     "writer symbol(s) C not in reader enum E"),
    ("enum-symbol-added-reader-default", enum("A", "B", default="A"), enum("A", "B", "C"),
     True, True, ""),
    ("enum-name-differs", enum("A"), enum("A", name="G"), False, False,
     ("enum name E does not match G",
      "enum name G does not match E")),
    ("enum-vs-string", enum("A"), "string", False, False, "cannot be read as"),
    # arrays and maps resolve items and values
    ("array-items-promoted", field_of({"type": "array", "items": "int"}),
     field_of({"type": "array", "items": "long"}), True, False,
     "R.x[]: type long cannot be read as int"),
    ("map-values-promoted", field_of({"type": "map", "values": "float"}),
     field_of({"type": "map", "values": "double"}), True, False,
     "R.x{}: type double cannot be read as float"),
    ("array-vs-map", {"type": "array", "items": "int"}, {"type": "map", "values": "int"},
     False, False, ("type array cannot be read as map", "type map cannot be read as array")),
    # fixed: names and sizes
    ("fixed-same", fixed(16), fixed(16), True, True, ""),
    ("fixed-size-differs", fixed(16), fixed(8), False, False,
     ("fixed size 16 cannot be read as size 8", "fixed size 8 cannot be read as size 16")),
    ("fixed-name-differs", fixed(16), fixed(16, name="G"), False, False,
     ("fixed name F does not match G",
      "fixed name G does not match F")),
    ("fixed-vs-bytes", fixed(4), "bytes", False, False,
     ("type fixed F(4) cannot be read as bytes",
      "type bytes cannot be read as fixed F(4)")),
    # unions on either side
    ("union-reader-only", field_of("int"), field_of(["null", "int"]), True, False,
     "R.x: type null cannot be read as int"),
    ("union-both-promoted", field_of(["null", "int"]), field_of(["null", "long"]), True, False,
     "R.x: type long cannot be read as union [null, int]"),
    ("union-reordered", ["int", "string"], ["string", "int"], True, True, ""),
    ("union-disjoint", ["int"], ["string"], False, False,
     ("type int cannot be read as union [string]",
      "type string cannot be read as union [int]")),
    ("union-writer-all-branches-promote", ["int", "long"], "double", True, False,
     "type double cannot be read as union [int, long]"),
    ("union-reader-picks-promotion", "int", ["null", "string", "long"], True, False,
     "cannot be read as int"),
    ("union-branch-added", ["null", "int"], ["null", "int", "string"], True, False,
     "type string cannot be read as union [null, int]"),
    ("union-of-records-nested", field_of(["null", rec(f("n", "long"), name="U")]),
     field_of(["null", rec(f("n", "int"), name="U")]), False, True,
     "R.x.n: type long cannot be read as int"),
    # named and recursive types
    ("recursive-same", long_list(), long_list(), True, True, ""),
    ("recursive-field-added-with-default", long_list(),
     long_list("long", f("tag", "string", default="")), True, True, ""),
    ("recursive-value-promoted", long_list("int"), long_list("long"), True, False,
     "LongList.value: type long cannot be read as int"),
    ("mutually-recursive",
     rec(f("b", ["null", rec(f("a", ["null", "R"]), f("n", "int"), name="B")])),
     rec(f("b", ["null", rec(f("a", ["null", "R"]), f("n", "long"), name="B")])),
     True, False, "R.b.n: type long cannot be read as int"),
    ("named-reference-reused",
     rec(f("a", fixed(4, name="Q")), f("b", "Q")), rec(f("a", fixed(4, name="Q")), f("b", "Q")),
     True, True, ""),
    # logical types: resolved on the underlying type; valid decimals need equal
    # precision and scale
    ("decimal-same", decimal(4, 2), decimal(4, 2), True, True, ""),
    ("decimal-precision-differs", decimal(4, 2), decimal(5, 2), False, False,
     ("type bytes (decimal(4,2)) cannot be read as bytes (decimal(5,2))",
      "type bytes (decimal(5,2)) cannot be read as bytes (decimal(4,2))")),
    ("decimal-scale-differs", decimal(4, 2, "bytes"), decimal(4, 1, "bytes"), False, False,
     "decimal"),
    ("decimal-vs-plain-bytes", decimal(4, 2), "bytes", True, True, ""),
    ("decimal-invalid-is-ignored", decimal(2, 4), decimal(4, 2), True, True, ""),
    ("fixed-decimal-differs", {**fixed(8), "logicalType": "decimal", "precision": 10},
     {**fixed(8), "logicalType": "decimal", "precision": 12}, False, False,
     ("(decimal(10,0)) cannot be read as fixed F(8) (decimal(12,0))",
      "(decimal(12,0)) cannot be read as fixed F(8) (decimal(10,0))")),
    ("timestamp-vs-long", {"type": "long", "logicalType": "timestamp-millis"}, "long",
     True, True, ""),
    ("date-to-timestamp", {"type": "int", "logicalType": "date"},
     {"type": "long", "logicalType": "timestamp-millis"}, True, False,
     "type long cannot be read as int"),
    ("uuid-vs-string", {"type": "string", "logicalType": "uuid"}, "string", True, True, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("a", "b", "b_reads_a", "a_reads_b", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
class TestSpecificationCases:
    def test_b_reads_data_written_with_a(
        self, a: Any, b: Any, b_reads_a: bool, a_reads_b: bool, fragment: str | tuple[str, str]
    ) -> None:
        """The reader B resolves the writer A exactly when the specification says so."""
        problems = reader_incompatibilities(reader=parse(b, "B"), writer=parse(a, "A"))
        assert (not problems) == b_reads_a, [str(p) for p in problems]
        if problems:
            expected = fragment if isinstance(fragment, str) else fragment[0]
            assert any(expected in str(p) for p in problems), [str(p) for p in problems]

    def test_a_reads_data_written_with_b(
        self, a: Any, b: Any, b_reads_a: bool, a_reads_b: bool, fragment: str | tuple[str, str]
    ) -> None:
        """The other direction of the same pair."""
        problems = reader_incompatibilities(reader=parse(a, "A"), writer=parse(b, "B"))
        assert (not problems) == a_reads_b, [str(p) for p in problems]
        if problems:
            expected = fragment if isinstance(fragment, str) else fragment[1]
            assert any(expected in str(p) for p in problems), [str(p) for p in problems]


class TestModes:
    """Confluent's modes over a history v1 -> v2 -> v3 (oldest first)."""

    v1 = parse(rec(f("a", "int"), f("x", "int")), "v1")
    v2 = parse(rec(f("a", "int")), "v2")  # drops x
    v3 = parse(rec(f("a", "int"), f("x", "string", default="")), "v3")  # x again, as a string

    def test_backward_checks_only_the_last_version(self) -> None:
        """v3 reads v2 (x has a default), so BACKWARD passes although v1's x is an int."""
        assert check(self.v3, [self.v1, self.v2], Mode.BACKWARD) == []

    def test_backward_transitive_checks_every_version(self) -> None:
        problems = check(self.v3, [self.v1, self.v2], Mode.BACKWARD_TRANSITIVE)
        assert [str(p) for p in problems] == ["R.x: type int cannot be read as string"]
        assert (problems[0].reader, problems[0].writer) == ("v3", "v1")

    def test_forward_means_the_old_schema_reads_the_new(self) -> None:
        """Removing a field without default breaks FORWARD (old readers need it)."""
        problems = check(self.v2, [self.v1], Mode.FORWARD)
        assert [str(p) for p in problems] == ["R.x: reader field has no default and the "
                                              "writer has no field of that name"]  # fmt: skip
        assert (problems[0].reader, problems[0].writer) == ("v1", "v2")
        assert check(self.v2, [self.v1], Mode.BACKWARD) == []

    def test_full_is_both_directions(self) -> None:
        assert check(self.v2, [self.v1], Mode.FULL) == check(self.v2, [self.v1], "forward")
        added = parse(rec(f("a", "int"), f("y", "long")), "added")
        problems = check(added, [self.v2], "full")
        assert [(p.reader, p.writer) for p in problems] == [("added", "v2")]

    def test_full_transitive_sees_every_pair(self) -> None:
        problems = check(self.v3, [self.v1, self.v2], Mode.FULL_TRANSITIVE)
        pairs = {(p.reader, p.writer) for p in problems}
        assert pairs == {("v3", "v1"), ("v1", "v3")}

    def test_none_accepts_anything(self) -> None:
        assert check(parse("string"), [parse("int")], Mode.NONE) == []


class TestInvalidSchemas:
    @pytest.mark.parametrize(
        ("schema", "fragment"),
        [
            (rec(f("a", "Nope")), "unknown type 'Nope'"),
            (rec(f("a", "int", default="one")), "R.a: invalid default 'one': not a int"),
            (rec(f("a", ["null", "int"], default="x")), "matches no branch"),
            (rec(f("a", [["null"], "int"])), "may not immediately contain another union"),
            (rec(f("a", ["int", "int"])), "union contains int twice"),
            (rec(f("a", "int"), f("a", "long")), "field 'a' is defined twice"),
            (enum("A", "B", default="C"), "default 'C' is not a symbol"),
            (rec(f("a", fixed(2)), f("b", fixed(2))), "'F' is defined twice"),
            ({"type": "fixed", "name": "F"}, "size must be a non-negative integer"),
            ({"type": "record", "name": "1R", "fields": []}, "invalid name '1R'"),
            (42, "a schema is a string, object or array"),
        ],
    )
    def test_is_refused_with_the_reason(self, schema: Any, fragment: str) -> None:
        with pytest.raises(SchemaError) as info:
            parse(schema, "s.avsc")
        assert fragment in str(info.value) and str(info.value).startswith("s.avsc: ")

    def test_union_default_may_match_any_branch(self) -> None:
        """The specification: a union default corresponds to the first branch it matches."""
        parse(rec(f("a", ["null", "int"], default=3)))

    def test_unreadable_file_names_the_file(self, tmp_path: Any) -> None:
        bad = tmp_path / "bad.avsc"
        bad.write_text("{not json")
        with pytest.raises(SchemaError, match=r"bad\.avsc: not JSON"):
            compat.load(bad)
        with pytest.raises(SchemaError, match=r"missing\.avsc: cannot read"):
            compat.load(tmp_path / "missing.avsc")
