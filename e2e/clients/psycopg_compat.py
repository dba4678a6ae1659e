#!/usr/bin/env python3
"""psycopg 3 compatibility checks for pgwarden.

Connects with the libpq environment (PGHOST, PGPORT, PGUSER, PGDATABASE,
PGSSLMODE; no password is needed in the e2e setup), runs a series of checks
and prints one `ok: <check>` line per passed check. The first failure prints
`FAIL: <check>: <reason>` (with a traceback) to stderr and exits 1.

The same program runs directly against PostgreSQL (to prove the checks are
right) and through the gateway (to prove the gateway is transparent).
"""

import datetime
import decimal
import json
import sys
import traceback
import uuid

try:
    import psycopg
    from psycopg import sql
    from psycopg.types.json import Jsonb
except ImportError as exc:  # pragma: no cover - environment problem
    print(f"FAIL: import: psycopg 3 is not installed ({exc}); "
          "install the Python package `psycopg[binary]`", file=sys.stderr)
    sys.exit(2)

TABLE = "compat_psycopg"
CHECKS = []


def check(name):
    """Register a check function under a name; run in order by main()."""
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def expect(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {actual!r}")


def connect(**kwargs):
    # An empty conninfo means: take everything from the PG* environment.
    return psycopg.connect("", **kwargs)


UTC = datetime.timezone.utc
TS = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
TEXT = "it's \"quoted\"; -- not a comment /* nor this */ \\ back\\slash, ünïcødé ✓ 漢字 🐘"
BYTES = bytes(range(256)) + b"\x00\x00tail"
NUMERIC = decimal.Decimal("12345678901234567890.000000000123456789")
JSONDOC = {"a": 1, "b": [True, None, "x'y"], "nested": {"ü": 1.5}}
UUID = uuid.UUID("6f1c0d5e-3b9a-4f0e-9a77-2f1b6f0c8e11")


@check("connect and server version")
def check_connect(conn):
    cur = conn.execute("SELECT current_setting('server_version_num')::int, current_database()")
    version, db = cur.fetchone()
    assert version >= 120000, f"unexpected server_version_num {version}"
    assert conn.info.parameter_status("client_encoding") == "UTF8", \
        f"client_encoding is {conn.info.parameter_status('client_encoding')!r}"
    assert db, "empty current_database()"


@check("setup table")
def check_setup(conn):
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(
        f"""CREATE TABLE {TABLE} (
            id integer PRIMARY KEY,
            label text,
            amount numeric,
            payload bytea,
            at timestamptz,
            tags text[],
            doc jsonb
        )"""
    )


@check("text-format parameters of several types")
def check_params_text(conn):
    params = (42, TEXT, NUMERIC, BYTES, TS, None, [1, 2, None, 4], ["a", "b,c", 'd"e', None],
              Jsonb(JSONDOC), UUID, True, 3.5)
    cur = conn.execute(
        "SELECT %s::int4, %s::text, %s::numeric, %s::bytea, %s::timestamptz, %s::text,"
        " %s::int4[], %s::text[], %s::jsonb, %s::uuid, %s::bool, %s::float8",
        params,
    )
    row = cur.fetchone()
    expect(row[0], 42, "int4")
    expect(row[1], TEXT, "text with quotes/unicode")
    expect(row[2], NUMERIC, "numeric")
    expect(bytes(row[3]), BYTES, "bytea")
    expect(row[4], TS, "timestamptz")
    expect(row[5], None, "NULL")
    expect(row[6], [1, 2, None, 4], "int4[]")
    expect(row[7], ["a", "b,c", 'd"e', None], "text[]")
    expect(row[8], JSONDOC, "jsonb")
    expect(row[9], UUID, "uuid")
    expect(row[10], True, "bool")
    expect(row[11], 3.5, "float8")


@check("insert with parameters and read back")
def check_insert_roundtrip(conn):
    with conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO {TABLE} (id, label, amount, payload, at, tags, doc)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (1, TEXT, NUMERIC, BYTES, TS, ["x", "y"], Jsonb(JSONDOC)),
        )
        expect(cur.rowcount, 1, "rowcount of INSERT")
        cur.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (2,))
        cur.execute(f"SELECT id, label, amount, payload, at, tags, doc FROM {TABLE} ORDER BY id")
        rows = cur.fetchall()
    expect(len(rows), 2, "row count")
    expect(rows[0][1:], (TEXT, NUMERIC, BYTES, TS, ["x", "y"], JSONDOC), "row 1")
    expect(rows[1], (2, None, None, None, None, None, None), "row 2 (all NULL)")


@check("binary results (cursor(binary=True))")
def check_binary_cursor(conn):
    with conn.cursor(binary=True) as cur:
        cur.execute(f"SELECT id, label, amount, payload, at, tags, doc FROM {TABLE} WHERE id = %s", (1,))
        row = cur.fetchone()
        formats = [cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)]
    expect(formats, [1] * 7, "result formats (1 = binary)")
    expect(row, (1, TEXT, NUMERIC, BYTES, TS, ["x", "y"], JSONDOC), "binary row")


@check("binary results (execute(..., binary=True)) of computed values")
def check_binary_execute(conn):
    cur = conn.cursor()
    cur.execute(
        "SELECT %s::int8, %s::numeric, %s::bytea, %s::timestamptz, NULL::int,"
        " ARRAY[1.5, -2.25]::float8[], %s::jsonb, %s::uuid, generate_series(1, 3)",
        (-(2 ** 62), decimal.Decimal("-0.000001"), b"\x00\xff", TS, Jsonb([1, "two"]), UUID),
        binary=True,
    )
    rows = cur.fetchall()
    expect(cur.pgresult.fformat(0), 1, "format of column 0")
    expect(len(rows), 3, "rows")
    expect(rows[0][:8], (-(2 ** 62), decimal.Decimal("-0.000001"), b"\x00\xff", TS, None,
                         [1.5, -2.25], [1, "two"], UUID), "binary computed row")
    expect([r[8] for r in rows], [1, 2, 3], "generate_series column")


@check("pipeline mode with an error and recovery")
def check_pipeline(conn):
    conn.execute(f"DELETE FROM {TABLE} WHERE id >= 100")
    with conn.pipeline() as p:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {TABLE} (id, label) VALUES (%s, %s)", (100, "p1"))
        cur.execute(f"INSERT INTO {TABLE} (id, label) VALUES (%s, %s)", (101, "p2"))
        cur2 = conn.cursor()
        cur2.execute("SELECT %s::text || %s::text", ("pipe", "line"))
        p.sync()
        expect(cur2.fetchone(), ("pipeline",), "pipelined SELECT")
        raised = None
        try:
            cur.execute(f"INSERT INTO {TABLE} (id, label) VALUES (%s, %s)", (102, "in failed block"))
            cur.execute("SELECT 1 / %s::int", (0,))
            cur.execute(f"INSERT INTO {TABLE} (id, label) VALUES (%s, %s)", (103, "aborted"))
            p.sync()
        except (psycopg.errors.DivisionByZero, psycopg.errors.PipelineAborted) as exc:
            raised = exc
            # psycopg may surface the error while reading results during an
            # execute(), before our sync was sent: close the failed group now,
            # whichever way the timing went.
            try:
                p.sync()
            except psycopg.Error:
                pass
        assert raised is not None, "division by zero inside the pipeline raised nothing"
        # The pipeline is usable again after the failed sync group.
        cur3 = conn.cursor()
        cur3.execute("SELECT 7 * %s::int", (6,))
        cur4 = conn.cursor()
        cur4.execute(f"SELECT array_agg(id ORDER BY id) FROM {TABLE} WHERE id >= 100")
    expect(cur3.fetchone(), (42,), "statement after the error")
    # 100 and 101 were committed by their own sync; 102 shared the failed implicit
    # transaction with the division and 103 was skipped.
    expect(cur4.fetchone(), ([100, 101],), "rows committed by the pipeline")
    expect(conn.execute("SELECT 1").fetchone(), (1,), "connection after the pipeline")


@check("server-side prepared statements reused (prepare_threshold=0)")
def check_prepared(conn):
    conn.prepare_threshold = 0
    try:
        query = "SELECT %s::int * 2 AS doubled, %s::text AS tag /* compat-prepared */"
        for i in range(60):
            row = conn.execute(query, (i, f"t{i}")).fetchone()
            expect(row, (i * 2, f"t{i}"), f"prepared execution {i}")
        with conn.cursor(binary=True) as cur:
            for i in range(20):
                cur.execute(query, (i, "b"))
                expect(cur.fetchone(), (i * 2, "b"), f"binary prepared execution {i}")
        rows = conn.execute(
            "SELECT name, statement FROM pg_prepared_statements"
            " WHERE statement LIKE %s AND statement NOT LIKE %s",
            ("%compat-prepared%", "%pg_prepared_statements%"),
        ).fetchall()
        assert len(rows) == 1, f"expected exactly one server-side prepared statement, got {rows!r}"
        assert "$1" in rows[0][1] and "$2" in rows[0][1], f"unexpected statement text {rows[0]!r}"
    finally:
        conn.prepare_threshold = 5


@check("COPY FROM STDIN (text) and COPY TO STDOUT")
def check_copy(conn):
    conn.execute(f"DELETE FROM {TABLE} WHERE id >= 1000")
    n = 5000
    with conn.cursor() as cur:
        with cur.copy(f"COPY {TABLE} (id, label, amount, at) FROM STDIN") as copy:
            for i in range(n):
                copy.write_row((1000 + i, f"row\t{i} ✓\n'q'", decimal.Decimal(i) / 4, TS))
        expect(cur.rowcount, n, "COPY FROM rowcount")
        count = cur.execute(f"SELECT count(*), sum(amount) FROM {TABLE} WHERE id >= 1000").fetchone()
        expect(count, (n, decimal.Decimal(sum(range(n))) / 4), "count/sum after COPY FROM")
        out = []
        with cur.copy(f"COPY (SELECT id, label, amount FROM {TABLE} WHERE id >= 1000 ORDER BY id) TO STDOUT") as copy:
            copy.set_types(["int4", "text", "numeric"])
            for row in copy.rows():
                out.append(row)
        expect(len(out), n, "COPY TO row count")
        expect(out[7], (1007, "row\t7 ✓\n'q'", decimal.Decimal("1.75")), "COPY TO sample row")
        raw = bytearray()
        with cur.copy(f"COPY {TABLE} (id, label) TO STDOUT WITH (FORMAT csv, HEADER)") as copy:
            for block in copy:
                raw += block
        lines = bytes(raw).decode().splitlines()
        expect(lines[0], "id,label", "CSV header")


@check("COPY binary in and out")
def check_copy_binary(conn):
    conn.execute(f"DELETE FROM {TABLE} WHERE id >= 1000")
    with conn.cursor() as cur:
        with cur.copy(f"COPY {TABLE} (id, payload, tags, doc) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "bytea", "text[]", "jsonb"])
            for i in range(1000):
                copy.write_row((1000 + i, BYTES[: i % 260], ["a", str(i)], Jsonb({"i": i})))
        back = []
        with cur.copy(f"COPY (SELECT id, payload, tags, doc FROM {TABLE} WHERE id >= 1000 ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "bytea", "text[]", "jsonb"])
            back = list(copy.rows())
    expect(len(back), 1000, "binary COPY row count")
    expect(back[259], (1259, BYTES[:259], ["a", "259"], {"i": 259}), "binary COPY sample row")


@check("transaction rollback")
def check_rollback(conn):
    before = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
    # Explicit transaction block, then rollback.
    with conn.transaction() as tx:
        conn.execute(f"INSERT INTO {TABLE} (id, label) VALUES (%s, %s)", (50, "rolled back"))
        inside = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
        expect(inside, before + 1, "count inside the transaction")
        raise psycopg.Rollback(tx)
    after = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
    expect(after, before, "count after rollback")
    # Non-autocommit connection: error inside the transaction, rollback, reuse.
    with connect(autocommit=False) as c2:
        c2.execute(f"INSERT INTO {TABLE} (id, label) VALUES (%s, %s)", (51, "doomed"))
        try:
            c2.execute(f"INSERT INTO {TABLE} (id, label) VALUES (%s, %s)", (51, "duplicate"))
            raise AssertionError("duplicate primary key was accepted")
        except psycopg.errors.UniqueViolation:
            pass
        expect(c2.info.transaction_status, psycopg.pq.TransactionStatus.INERROR, "status after error")
        c2.rollback()
        expect(c2.execute(f"SELECT count(*) FROM {TABLE} WHERE id = 51").fetchone(), (0,), "after rollback")
        c2.commit()
    # Savepoints.
    with conn.transaction():
        conn.execute(f"INSERT INTO {TABLE} (id, label) VALUES (%s, %s)", (52, "kept"))
        try:
            with conn.transaction():
                conn.execute(f"INSERT INTO {TABLE} (id, label) VALUES (%s, %s)", (52, "dup"))
        except psycopg.errors.UniqueViolation:
            pass
    expect(conn.execute(f"SELECT label FROM {TABLE} WHERE id = 52").fetchone(), ("kept",), "savepoint rollback")


@check("executemany")
def check_executemany(conn):
    conn.execute(f"DELETE FROM {TABLE} WHERE id >= 10000")
    rows = [(10000 + i, f"many {i}", decimal.Decimal(i)) for i in range(500)]
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {TABLE} (id, label, amount) VALUES (%s, %s, %s)", rows)
        expect(cur.rowcount, 500, "executemany rowcount")
        cur.executemany(
            f"UPDATE {TABLE} SET amount = amount + %s WHERE id = %s RETURNING id, amount",
            [(1, 10000 + i) for i in range(0, 500, 100)],
            returning=True,
        )
        returned = []
        while True:
            returned.append(cur.fetchone())
            if not cur.nextset():
                break
        expect(returned, [(10000 + i, decimal.Decimal(i + 1)) for i in range(0, 500, 100)], "RETURNING rows")
        got = cur.execute(f"SELECT count(*), sum(amount) FROM {TABLE} WHERE id >= 10000").fetchone()
    expect(got, (500, decimal.Decimal(sum(range(500)) + 5)), "count/sum after executemany")


@check("error then reuse of the connection")
def check_error_reuse(conn):
    try:
        conn.execute("SELECT * FROM no_such_table_compat")
        raise AssertionError("query on a missing table succeeded")
    except psycopg.errors.UndefinedTable as exc:
        expect(exc.sqlstate, "42P01", "SQLSTATE")
    try:
        conn.execute("SELECT %s::int", ("not a number",))
        raise AssertionError("bad integer accepted")
    except psycopg.errors.InvalidTextRepresentation:
        pass
    expect(conn.execute("SELECT %s::text", ("still alive",)).fetchone(), ("still alive",), "after errors")


@check("server-side cursor streaming")
def check_named_cursor(conn):
    with conn.transaction():
        with conn.cursor(name="compat_stream") as cur:
            cur.itersize = 1000
            cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
            total = 0
            count = 0
            for g, _ in cur:
                total += g
                count += 1
    expect((count, total), (20000, 20000 * 20001 // 2), "streamed rows")


@check("notices and parameter status")
def check_notice(conn):
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    # A NOTICE from a statement a default-deny policy allows (DDL on public.*).
    conn.execute("DROP TABLE IF EXISTS no_such_table_for_notice")
    expect(notices, ['table "no_such_table_for_notice" does not exist, skipping'], "notices")
    conn.execute("SET application_name = 'compat-psycopg'")
    expect(conn.info.parameter_status("application_name"), "compat-psycopg", "ParameterStatus")


@check("cleanup")
def check_cleanup(conn):
    conn.execute(f"DROP TABLE {TABLE}")


def main():
    try:
        conn = connect(autocommit=True)
    except Exception as exc:  # noqa: BLE001 - report anything
        print(f"FAIL: connect: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    with conn:
        for name, fn in CHECKS:
            try:
                fn(conn)
            except Exception as exc:  # noqa: BLE001 - report anything
                traceback.print_exc()
                print(f"FAIL: {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            print(f"ok: {name}", flush=True)
    print(f"all {len(CHECKS)} psycopg checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
