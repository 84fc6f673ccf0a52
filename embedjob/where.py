"""``embedjob filter``: keep the rows of a job's output whose metadata satisfies a ``--where`` expression,
and write their keys. Torch-free; needs pyarrow (``embedjob[read]``).

The expression is parsed here, never evaluated as Python (no ``eval``)::

    expr       := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | "(" expr ")" | comparison
    comparison := operand OP operand          OP: < <= > >= == !=  ("=" is "==")
    operand    := column | number | 'string' | "string"

A column is a metadata column (``aesthetic``, ``nsfw``, ``clip_score``, ``width``, ``height``, ``key``,
``shard``, ``member``, ...); a comparison with a missing value (null, NaN) is false.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedjob.layout import shard_outputs
from embedjob.results import done_stems, in_order
from embedjob.storage import Storage

OPERATORS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
             "==": np.equal, "=": np.equal, "!=": np.not_equal}
_TOKEN = re.compile(r"""\s*(?:
    (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>'[^']*'|"[^"]*")
  | (?P<op><=|>=|==|!=|<|>|=)
  | (?P<paren>[()])
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
)""", re.VERBOSE)
KEYWORDS = {"and", "or", "not"}


class WhereError(ValueError):
    """A malformed ``--where`` expression, with the position of the problem."""


@dataclass(frozen=True)
class Column:
    name: str


@dataclass(frozen=True)
class Compare:
    left: Any  # Column | float | str
    op: str
    right: Any


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or" | "not"
    args: tuple


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise WhereError(f"unexpected character {text[pos:].lstrip()[:1]!r} at position "
                             f"{len(text) - len(text[pos:].lstrip()) + 1} of {text!r}")
        kind = m.lastgroup or ""
        value, start = m.group(kind), m.start(kind)
        if kind == "name" and value.lower() in KEYWORDS:
            kind, value = "keyword", value.lower()
        out.append((kind, value, start + 1))
        pos = m.end()
    return out


MAX_LENGTH = 10_000  # characters of an expression
MAX_DEPTH = 64  # nested '(' and 'not'


def parse_where(text: str) -> Any:
    """The expression's tree (Compare / BoolOp). Raises :class:`WhereError` saying what is wrong where.
    Bounded: at most MAX_LENGTH characters and MAX_DEPTH levels of '(' and 'not'."""
    if not isinstance(text, str) or not text.strip():
        raise WhereError("the expression is empty (e.g. \"aesthetic >= 5.5 and nsfw < 0.1\")")
    if len(text) > MAX_LENGTH:
        raise WhereError(f"the expression is {len(text)} characters long; at most {MAX_LENGTH}")
    tokens = _tokens(text)
    i = 0
    depth = 0

    def peek() -> tuple[str, str, int] | None:
        return tokens[i] if i < len(tokens) else None

    def where(tok: tuple[str, str, int] | None) -> str:
        return f"at position {tok[2]}" if tok else "at the end"

    def take() -> tuple[str, str, int]:
        nonlocal i
        tok = peek()
        if tok is None:
            raise WhereError(f"{text!r} ends too early: expected more after it")
        i += 1
        return tok

    def operand() -> Any:
        kind, value, pos = take()
        if kind == "number":
            return float(value)
        if kind == "string":
            return value[1:-1]
        if kind == "name":
            return Column(value)
        raise WhereError(f"expected a column, a number or a quoted string at position {pos}, got {value!r}")

    def comparison() -> Any:
        left = operand()
        tok = peek()
        if tok is None or tok[0] != "op":
            got = repr(tok[1]) if tok else "the end"
            raise WhereError(f"expected a comparison (< <= > >= == !=) {where(tok)}, got {got}")
        take()
        right = operand()
        if not isinstance(left, Column) and not isinstance(right, Column):
            raise WhereError(f"the comparison {where(tok)} compares two constants: one side must be a column")
        return Compare(left, tok[1], right)

    def not_() -> Any:
        nonlocal depth
        tok = peek()
        if tok and tok[:2] in (("keyword", "not"), ("paren", "(")):
            depth += 1
            if depth > MAX_DEPTH:
                raise WhereError(f"more than {MAX_DEPTH} nested '(' or 'not' at position {tok[2]}")
            try:
                take()
                if tok[1] == "not":
                    return BoolOp("not", (not_(),))
                inner = or_()
                close = peek()
                if close is None or close[:2] != ("paren", ")"):
                    raise WhereError(f"missing ')' for the '(' at position {tok[2]}")
                take()
                return inner
            finally:
                depth -= 1
        return comparison()

    def and_() -> Any:
        args = [not_()]
        while (tok := peek()) and tok[:2] == ("keyword", "and"):
            take()
            args.append(not_())
        return args[0] if len(args) == 1 else BoolOp("and", tuple(args))

    def or_() -> Any:
        args = [and_()]
        while (tok := peek()) and tok[:2] == ("keyword", "or"):
            take()
            args.append(and_())
        return args[0] if len(args) == 1 else BoolOp("or", tuple(args))

    tree = or_()
    if (tok := peek()) is not None:
        raise WhereError(f"unexpected {tok[1]!r} at position {tok[2]} (join conditions with 'and' / 'or')")
    return tree


def columns_of(tree: Any) -> set[str]:
    if isinstance(tree, Column):
        return {tree.name}
    if isinstance(tree, Compare):
        return columns_of(tree.left) | columns_of(tree.right)
    if isinstance(tree, BoolOp):
        return set().union(*(columns_of(a) for a in tree.args))
    return set()


def evaluate(tree: Any, table: Any) -> np.ndarray:
    """The boolean mask of ``table``'s rows (a pyarrow Table) that satisfy ``tree``."""
    n = table.num_rows

    def value(x: Any) -> tuple[np.ndarray | float | str, np.ndarray]:
        if isinstance(x, Column):
            col = table.column(x.name)
            valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            arr = col.to_numpy(zero_copy_only=False)
            if arr.dtype.kind == "f":
                valid &= ~np.isnan(arr)
            return arr, valid
        return x, np.ones(n, dtype=bool)

    if isinstance(tree, BoolOp):
        parts = [evaluate(a, table) for a in tree.args]
        if tree.op == "not":
            return ~parts[0]
        return np.logical_and.reduce(parts) if tree.op == "and" else np.logical_or.reduce(parts)
    left, lvalid = value(tree.left)
    right, rvalid = value(tree.right)
    numeric = [isinstance(v, float) or (isinstance(v, np.ndarray) and v.dtype.kind in "fiub")
               for v in (left, right)]
    if numeric[0] != numeric[1]:
        names = " and ".join(str(getattr(v, "name", v)) for v in (tree.left, tree.right))
        raise WhereError(f"cannot compare {names}: one is a number, the other text")
    with np.errstate(invalid="ignore"):
        result = np.asarray(OPERATORS[tree.op](left, right), dtype=bool)
    return np.broadcast_to(result, (n,)) & lvalid & rvalid


KEPT_COLUMNS = ("key", "shard", "member")
READ_THREADS = 16  # shards whose metadata is read at once (object-store latency)


def kept_schema() -> Any:
    """The schema of the kept rows: ``key``, ``shard``, ``member``, ``stem``, ``row`` (the row in the
    shard's ``.npy``)."""
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("shard", pa.string()), ("member", pa.string()),
                      ("stem", pa.string()), ("row", pa.int64())])


def iter_kept(output_uri: str, where: str, storage: Storage | None = None) -> Iterator[Any]:
    """Each finished shard's rows that satisfy ``where`` (a pyarrow Table of :func:`kept_schema`), shard
    by shard in stem order: memory holds a few shards' columns, never the output's. Only the columns
    ``where`` names and the kept columns are decoded. Raises :class:`WhereError` for a malformed
    expression (before any shard is read) or a column a shard's metadata lacks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tree = parse_where(where)
    needed = columns_of(tree)
    storage = storage or Storage()
    schema = kept_schema()

    def read(stem: str) -> Any:
        parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(shard_outputs(output_uri, stem).metadata)))
        names = parquet.schema_arrow.names
        missing = sorted(needed - set(names))
        if missing:
            raise WhereError(f"no column {missing[0]!r} in {stem}'s metadata (columns: {', '.join(names)})")
        table = parquet.read(columns=sorted(needed | set(KEPT_COLUMNS)))
        rows = np.flatnonzero(evaluate(tree, table))
        kept = table.select(list(KEPT_COLUMNS)).take(pa.array(rows, pa.int64()))
        return (kept.append_column("stem", pa.array([stem] * len(rows), pa.string()))
                .append_column("row", pa.array(rows, pa.int64())).cast(schema))

    return in_order(read, sorted(done_stems(output_uri, storage)), READ_THREADS)


def select_keys(output_uri: str, where: str, storage: Storage | None = None) -> Any:
    """Every finished shard's rows that satisfy ``where``, as one pyarrow Table of :func:`kept_schema`,
    in stem then row order: :func:`iter_kept`'s tables joined, so all in memory at once
    (``embedjob filter`` writes them shard by shard instead: :func:`write_kept`)."""
    import pyarrow as pa

    parts = list(iter_kept(output_uri, where, storage))
    return pa.concat_tables(parts) if parts else kept_schema().empty_table()


def write_kept(output_uri: str, where: str, path: str, storage: Storage | None = None) -> int:
    """Write the rows that satisfy ``where`` to the parquet file ``path``, shard by shard, and return how
    many. The file appears under its name only complete: it is written beside it and renamed; on any
    error nothing is left."""
    import os
    import tempfile

    import pyarrow.parquet as pq

    tables = iter_kept(output_uri, where, storage)  # a malformed expression raises here, before any file
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".kept-", suffix=".parquet", dir=folder)
    os.close(fd)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, kept_schema()) as writer:
            for table in tables:
                writer.write_table(table)
                rows += table.num_rows
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return rows
