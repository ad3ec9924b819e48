"""Statement shapes: SQL text with every value taken out, so it can be counted and shown.

A *shape* is what stays of a statement when its values are removed: string, number, boolean
and dollar-quoted literals and bind placeholders (``$1``, ``:name``, ``%(name)s``, ``%s``,
``?``) all become ``?``; ``IN (?, ?, ?)``, ``ARRAY[?, ?]`` and multi-row ``VALUES (?, ?), (?, ?)``
collapse to one element; comments are dropped (they may carry request data, e.g. sqlcommenter);
whitespace is normalised; the result is at most :data:`MAX_SHAPE_CHARS` characters long.

So the same statement run with different values has one shape (which is how N+1 queries are
recognised), and a shape never contains a value: shapes are safe to put in logs, span events and
findings. Nothing here imports a database library; results are cached (bounded).
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_SHAPE_CHARS = 1000
"""Longest shape returned; longer ones are cut and end with an ellipsis."""
MAX_INPUT_CHARS = 32_768
"""Only this much of a statement is read: a cut literal is still recognised and removed."""
_MAX_CACHED_CHARS = 4096
"""Longer statements are normalised without the cache, so cache keys stay small."""
_ELLIPSIS = "…"
_MAX_PASSES = 5

# One scanner for everything that must be recognised left to right: a quote inside a comment or
# a comment marker inside a string must not confuse the other. Unterminated strings and comments
# run to the end of the text, so a statement cut anywhere never leaks the rest of a literal.
_COMMON_TOKENS = r"""
  (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
| (?P<dollar>\$\$.*?(?:\$\$|\Z)|\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)\$.*?(?:\$(?P=tag)\$|\Z))
| (?P<estring>(?<![\w$])[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z))
| (?P<ident>`(?:[^`]|``)*(?:`|\Z))
| (?P<bind>%\([^)\s]*\)s|%s|\$\d+|(?<!:):(?!:)(?:[A-Za-z_]\w*|\d+)|\?)
| (?P<number>(?<![\w$])(?:0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?![\w$]))
| (?P<boolean>(?<![\w$])(?:[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])(?![\w$]))
"""
# Standard SQL (PostgreSQL, SQLite, ...): '' escapes a quote, backslash is an ordinary character,
# and "..." is an identifier (kept).
_STANDARD = re.compile(
    _COMMON_TOKENS
    + r"""
| (?P<string>(?:(?<![\w$])(?:[nNbBxX]|[uU]&))?'(?:[^']|'')*(?:'|\Z))
| (?P<qident>"(?:[^"]|"")*(?:"|\Z))
""",
    re.VERBOSE | re.DOTALL,
)
# MySQL/MariaDB: backslash escapes inside strings, and "..." is a string too.
_BACKSLASH = re.compile(
    _COMMON_TOKENS
    + r"""
| (?P<string>(?:(?<![\w$])(?:[nNbBxX]|_[A-Za-z0-9]+))?'(?:[^'\\]|\\.|'')*(?:'|\Z))
| (?P<dstring>"(?:[^"\\]|\\.|"")*(?:"|\Z))
""",
    re.VERBOSE | re.DOTALL,
)
_VALUE_GROUPS = frozenset({"dollar", "estring", "bind", "number", "boolean", "string", "dstring"})

# A sign in front of a value is part of the value when it follows an operator, a bracket, a
# comma or a keyword (``= -5``, ``THEN -1``), not an operand (``a - 5`` stays a subtraction).
# Group 1 keeps what precedes the sign.
_UNARY_SIGN = re.compile(
    r"((?:(?<=[=<>(,\[+\-*/%^|&~!])|(?<![\w$])(?i:SELECT|WHEN|THEN|ELSE|AND|OR|NOT|IS|IN|LIKE"
    r"|BETWEEN|BY|LIMIT|OFFSET|VALUES|RETURN|SET|WHERE|ON|AS|ANY|ALL)|\A)\s*)[-+](?:\s*[-+])*\s*\?"
)
_IN_LIST = re.compile(r"(?i)(?<![\w$])(IN)\s*\(\s*\?(?:\s*,\s*\?)*\s*\)")
_ARRAY = re.compile(r"\[\s*\?(?:\s*,\s*\?)+\s*\]")
_ROWS = re.compile(r"(\(\s*\?(?:\s*,\s*\?)*\s*\))(?:\s*,\s*\(\s*\?(?:\s*,\s*\?)*\s*\))+")
_SPACE = re.compile(r"\s+")
_FIRST_WORD = re.compile(r"[\s(]*([A-Za-z]+)")
_WORD_OR_PAREN = re.compile(r"[A-Za-z_]\w*|[()]")

OPERATIONS = frozenset(
    {
        "ALTER", "ANALYZE", "BEGIN", "CALL", "CLOSE", "CLUSTER", "COMMENT", "COMMIT", "COPY",
        "CREATE", "DEALLOCATE", "DECLARE", "DELETE", "DISCARD", "DO", "DROP", "EXEC", "EXECUTE",
        "EXPLAIN", "FETCH", "GRANT", "INSERT", "LISTEN", "LOCK", "MERGE", "NOTIFY", "PRAGMA",
        "PREPARE", "REFRESH", "REINDEX", "RELEASE", "REPLACE", "RESET", "REVOKE", "ROLLBACK",
        "SAVEPOINT", "SELECT", "SET", "SHOW", "START", "TRUNCATE", "UNLISTEN", "UPDATE", "UPSERT",
        "USE", "VACUUM", "VALUES", "WITH",
    }
)  # fmt: skip
"""Operation names used as metric label values; any other first word becomes ``OTHER``."""
_CTE_BODY_VERBS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES"})


def _replace(match: re.Match[str]) -> str:
    group = match.lastgroup
    if group in _VALUE_GROUPS:
        return "?"
    if group == "comment":
        return " "
    return match.group()  # identifiers stay as they are


def _normalize_once(text: str, scanner: re.Pattern[str]) -> str:
    text = scanner.sub(_replace, text)
    text = _UNARY_SIGN.sub(r"\1?", text)
    text = _IN_LIST.sub(r"\1 (?)", text)
    text = _ARRAY.sub("[?]", text)
    text = _ROWS.sub(r"\1", text)
    text = _SPACE.sub(" ", text).strip()
    if len(text) > MAX_SHAPE_CHARS:
        text = text[: MAX_SHAPE_CHARS - 1].rstrip() + _ELLIPSIS
    return text


def _normalize(statement: str, backslash_escapes: bool) -> str:
    scanner = _BACKSLASH if backslash_escapes else _STANDARD
    text = statement[:MAX_INPUT_CHARS]
    # A replacement can make its neighbour recognisable (``0$$`` -> ``0?`` -> ``??``): repeat
    # until nothing changes, so a shape is its own shape. Real statements settle in one pass.
    for _ in range(_MAX_PASSES):
        normalized = _normalize_once(text, scanner)
        if normalized == text:
            break
        text = normalized
    return text


def _operation(shape: str) -> str:
    match = _FIRST_WORD.match(shape)
    if match is None:
        return "OTHER"
    word = match.group(1).upper()
    if word not in OPERATIONS:
        return "OTHER"
    if word == "WITH":
        # The operation of ``WITH a AS (...) INSERT ...`` is the statement after the CTEs: the
        # first data verb outside every parenthesis.
        depth = 0
        for token in _WORD_OR_PAREN.finditer(shape, match.end()):
            text = token.group()
            if text == "(":
                depth += 1
            elif text == ")":
                depth -= 1
            elif depth == 0 and text.upper() in _CTE_BODY_VERBS:
                return text.upper()
    return word


@lru_cache(maxsize=4096)
def _describe_cached(statement: str, backslash_escapes: bool) -> tuple[str, str]:
    shape = _normalize(statement, backslash_escapes)
    return shape, _operation(shape)


def describe(statement: str, *, backslash_escapes: bool = False) -> tuple[str, str]:
    """The shape of *statement* and its operation name (``SELECT``, ``INSERT``, ... or ``OTHER``).

    *backslash_escapes* selects MySQL/MariaDB string syntax (backslash escapes, ``"..."``
    strings); the default is standard SQL as PostgreSQL and SQLite speak it.
    """
    if len(statement) > _MAX_CACHED_CHARS:
        shape = _normalize(statement, backslash_escapes)
        return shape, _operation(shape)
    return _describe_cached(statement, backslash_escapes)


def statement_shape(statement: str, *, backslash_escapes: bool = False) -> str:
    """The shape of *statement*: its text with every literal and bind value replaced by ``?``."""
    return describe(statement, backslash_escapes=backslash_escapes)[0]


def operation_name(statement: str) -> str:
    """The statement's operation (first keyword; for ``WITH``, the verb after the CTEs)."""
    return describe(statement)[1]
