"""Statement shapes: values never survive, shapes are stable across values, and idempotent."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from asyncsentinel.sources.sql_shapes import (
    MAX_SHAPE_CHARS,
    OPERATIONS,
    describe,
    operation_name,
    statement_shape,
)

# Statements with value slots ({}), in the shapes SQLAlchemy and hand-written SQL produce.
TEMPLATES = [
    "SELECT users.id, users.name FROM users WHERE users.name = {} AND users.age > {}",
    "SELECT * FROM t WHERE id IN ({}, {}, {}) ORDER BY id LIMIT {} OFFSET {}",
    "INSERT INTO t (a, b) VALUES ({}, {}), ({}, {}) RETURNING t.id",
    "UPDATE t SET note={}, at = {} WHERE id = {} -- trailing comment",
    "SELECT {} AS x, CASE WHEN a = {} THEN {} ELSE {} END FROM t /* block */",
    "WITH c AS (SELECT {} AS v) SELECT v FROM c WHERE v <> {}",
    "SELECT * FROM t WHERE a BETWEEN {} AND {} OR b NOT LIKE {}",
    "SELECT ARRAY[{}, {}, {}], t.tags @> ARRAY[{}] FROM t",
    "DELETE FROM sessions WHERE token = {} AND expires < now() - {}::interval",
    "select count(*)\n  from orders\n where total>={}\tand customer_id in ({})",
]


def _standard_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _escape_string(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dollar_string(value: str) -> str:
    return "$q$" + value.replace("$q$", "") + "$q$"


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
literals = st.one_of(
    texts.map(_standard_string),
    texts.map(_escape_string),
    texts.map(_dollar_string),
    texts.map(lambda v: "N" + _standard_string(v)),
    st.integers().map(str),
    st.integers(min_value=0).map(hex),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False, places=4).map(str),
    st.sampled_from(["TRUE", "false", "True"]),
    st.sampled_from(["$1", "$12", ":name", ":id_1", "%(user_id)s", "%s", "?", ":3"]),
)


def _fill(template: str, values: list[str]) -> str:
    return template.format(*values)


@given(st.sampled_from(TEMPLATES), st.data())
@settings(max_examples=400)
def test_shape_does_not_depend_on_the_values(template: str, data: st.DataObject) -> None:
    slots = template.count("{}")
    values = data.draw(st.lists(literals, min_size=slots, max_size=slots))
    assert statement_shape(_fill(template, values)) == statement_shape(
        _fill(template, ["?"] * slots)
    )


@given(
    st.sampled_from(TEMPLATES),
    st.data(),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="'"), min_size=1),
)
@settings(max_examples=300)
def test_no_literal_survives(template: str, data: st.DataObject, secret: str) -> None:
    marker = "Zq9" + secret  # "Zq9" is in no template: any trace of it is a leak
    slots = template.count("{}")
    values = data.draw(
        st.lists(
            st.sampled_from(
                [_standard_string(marker), _escape_string(marker), _dollar_string(marker)]
            ),
            min_size=slots,
            max_size=slots,
        )
    )
    shape = statement_shape(_fill(template, values))
    assert "Zq9" not in shape
    number = data.draw(st.integers(min_value=10**6))
    assert str(number) not in statement_shape(_fill(template, [str(number)] * slots))


@given(st.text(max_size=300))
@settings(max_examples=500)
@example("= - - 1")
@example("SELECT 'a'b'")
@example("\"unterminated ' identifier")
@example("x" * (MAX_SHAPE_CHARS + 50) + " = 1")
def test_shape_is_idempotent(statement: str) -> None:
    shape = statement_shape(statement)
    assert statement_shape(shape) == shape
    assert len(shape) <= MAX_SHAPE_CHARS


@given(st.text(max_size=100), st.sampled_from(["'", "E'", "$$", "$t$", "/*"]))
def test_a_literal_cut_anywhere_is_still_removed(prefix: str, opener: str) -> None:
    # Statements are read up to a bound: an unterminated literal runs to the end.
    shape = statement_shape(f"SELECT * FROM t WHERE a = {opener}Zq9 {prefix}")
    assert "Zq9" not in shape


@pytest.mark.parametrize(
    ("statement", "shape"),
    [
        (
            "SELECT a FROM t WHERE id IN ($1, $2, $3) AND b = $4::int",
            "SELECT a FROM t WHERE id IN (?) AND b = ?::int",
        ),
        (
            "SELECT a FROM t WHERE id IN (__[POSTCOMPILE_id_1])",
            "SELECT a FROM t WHERE id IN (__[POSTCOMPILE_id_1])",
        ),
        (
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?)",
            "INSERT INTO t (a, b) VALUES (?, ?)",
        ),
        ("SELECT users_1.col2 FROM users AS users_1", "SELECT users_1.col2 FROM users AS users_1"),
        ('SELECT "Weird Col 1" FROM "t2"', 'SELECT "Weird Col 1" FROM "t2"'),
        ("select a - 5, a = -5, -3", "select a - ?, a = ?, ?"),
        ("SELECT 1 /* 's3cr3t' */ -- more\n FROM t", "SELECT ? FROM t"),
        ("SELECT DATE'2020-01-01', x'ff'", "SELECT DATE?, ?"),
    ],
)
def test_known_shapes(statement: str, shape: str) -> None:
    assert statement_shape(statement) == shape


def test_mysql_strings_use_backslash_escapes() -> None:
    statement = "SELECT 'it\\'s s3cr3t', \"also s3cr3t\" FROM t"
    assert describe(statement, backslash_escapes=True) == ("SELECT ?, ? FROM t", "SELECT")


@pytest.mark.parametrize(
    ("statement", "operation"),
    [
        ("SELECT 1", "SELECT"),
        ("  (select 1) union (select 2)", "SELECT"),
        ("insert into t values (1)", "INSERT"),
        ("WITH a AS (SELECT 1), b AS (SELECT 2) UPDATE t SET x = 1", "UPDATE"),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r",
            "SELECT",
        ),
        ("SAVEPOINT sa_savepoint_1", "SAVEPOINT"),
        ("frobnicate the database", "OTHER"),
        ("", "OTHER"),
    ],
)
def test_operation_names(statement: str, operation: str) -> None:
    assert operation_name(statement) == operation
    assert operation in OPERATIONS | {"OTHER"}


def test_long_statements_are_bounded() -> None:
    statement = "SELECT " + ", ".join(f"col_{i}" for i in range(5000)) + " FROM t WHERE a = 'Zq9'"
    shape = statement_shape(statement)
    assert len(shape) == MAX_SHAPE_CHARS and shape.endswith("…")
    assert "Zq9" not in shape
