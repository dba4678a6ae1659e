#!/usr/bin/env python3
"""asyncpg compatibility checks for pgwarden.

asyncpg speaks only the extended protocol with binary formats, so this covers
the binary paths. Connects with the libpq environment (PGHOST, PGPORT, PGUSER,
PGDATABASE, PGSSLMODE), prints `ok: <check>` per passed check; the first failure
prints `FAIL: <check>: <reason>` (with a traceback) to stderr and exits 1.
"""

import asyncio
import datetime
import decimal
import json
import os
import sys
import traceback
import uuid

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - environment problem
    print(f"FAIL: import: asyncpg is not installed ({exc}); install the Python package `asyncpg`",
          file=sys.stderr)
    sys.exit(2)

TABLE = "compat_asyncpg"
CHECKS = []

UTC = datetime.timezone.utc
TS = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
TEXT = "it's \"quoted\"; -- ünïcødé ✓ 漢字 🐘 \\"
BYTES = bytes(range(256)) + b"\x00tail"
NUMERIC = decimal.Decimal("-98765432109876543210.000000000000000001")
UUID = uuid.UUID("0e5b8a52-9d3c-4b1a-8f7e-6c5d4b3a2f10")
JSONDOC = {"k": [1, 2.5, None, "s'q"], "ü": {"deep": True}}


def check(name):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def expect(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {actual!r}")


async def connect():
    # asyncpg reads PGHOST/PGPORT/PGUSER/PGDATABASE/PGSSLMODE itself; pass them
    # explicitly anyway so a missing variable is an obvious error, not a default.
    conn = await asyncpg.connect(
        host=os.environ["PGHOST"],
        port=int(os.environ["PGPORT"]),
        user=os.environ["PGUSER"],
        database=os.environ["PGDATABASE"],
        ssl=False if os.environ.get("PGSSLMODE", "disable") == "disable" else None,
    )
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    return conn


@check("connect and server version")
async def check_connect(conn):
    version = conn.get_server_version()
    assert version.major >= 12, f"unexpected server version {version}"
    expect(await conn.fetchval("SELECT 1"), 1, "SELECT 1")


@check("setup tables")
async def check_setup(conn):
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}, {TABLE}_copy")
    await conn.execute(
        f"""CREATE TABLE {TABLE} (
            id int8 PRIMARY KEY,
            label text,
            amount numeric,
            ref uuid,
            payload bytea,
            at timestamptz,
            doc jsonb,
            tags text[]
        )"""
    )
    await conn.execute(f"CREATE TABLE {TABLE}_copy (id int4, name text, score float8, at timestamptz)")


@check("fetch with parameters: type round-trips")
async def check_types(conn):
    row = await conn.fetchrow(
        "SELECT $1::int8 AS i8, $2::numeric AS num, $3::uuid AS u, $4::bytea AS b,"
        " $5::timestamptz AS ts, $6::jsonb AS j, $7::int4[] AS arr, $8::text[] AS tarr,"
        " $9::text AS t, $10::int4 AS n, $11::float8 AS f, $12::bool AS bo, $13::date AS d,"
        " $14::interval AS iv",
        -(2 ** 63), NUMERIC, UUID, BYTES, TS, JSONDOC, [1, None, -3], ["a", "b c", None, '"'],
        TEXT, None, -1.25, False, datetime.date(2000, 1, 1), datetime.timedelta(days=3, seconds=7),
    )
    expect(row["i8"], -(2 ** 63), "int8")
    expect(row["num"], NUMERIC, "numeric")
    expect(row["u"], UUID, "uuid")
    expect(row["b"], BYTES, "bytea")
    expect(row["ts"], TS, "timestamptz")
    expect(row["j"], JSONDOC, "jsonb")
    expect(row["arr"], [1, None, -3], "int4[]")
    expect(row["tarr"], ["a", "b c", None, '"'], "text[]")
    expect(row["t"], TEXT, "text")
    expect(row["n"], None, "NULL")
    expect(row["f"], -1.25, "float8")
    expect(row["bo"], False, "bool")
    expect(row["d"], datetime.date(2000, 1, 1), "date")
    expect(row["iv"], datetime.timedelta(days=3, seconds=7), "interval")


@check("insert and select table row")
async def check_table_roundtrip(conn):
    status = await conn.execute(
        f"INSERT INTO {TABLE} (id, label, amount, ref, payload, at, doc, tags)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        1, TEXT, NUMERIC, UUID, BYTES, TS, JSONDOC, ["x", "y"],
    )
    expect(status, "INSERT 0 1", "command tag")
    row = await conn.fetchrow(f"SELECT * FROM {TABLE} WHERE id = $1", 1)
    expect(tuple(row), (1, TEXT, NUMERIC, UUID, BYTES, TS, JSONDOC, ["x", "y"]), "stored row")


@check("prepared statement reuse (conn.prepare)")
async def check_prepare(conn):
    stmt = await conn.prepare("SELECT $1::int8 * 3 AS tripled, $2::text || '!' AS shout")
    attrs = [a.name for a in stmt.get_attributes()]
    expect(attrs, ["tripled", "shout"], "prepared attributes")
    params = [p.name for p in stmt.get_parameters()]
    expect(params, ["int8", "text"], "prepared parameter types")
    for i in range(100):
        row = await stmt.fetchrow(i, f"v{i}")
        expect(tuple(row), (i * 3, f"v{i}!"), f"execution {i}")
    expect(await stmt.fetchval(7, "x"), 21, "fetchval")
    rows = await conn.fetch("SELECT name FROM pg_prepared_statements WHERE statement LIKE '%tripled%'"
                            " AND statement NOT LIKE '%pg_prepared_statements%'")
    assert len(rows) >= 1, "the prepared statement is not visible in pg_prepared_statements"


@check("executemany of 1000 rows")
async def check_executemany(conn):
    rows = [(100 + i, f"label {i}", decimal.Decimal(i) / 100, uuid.UUID(int=i), TS + datetime.timedelta(seconds=i))
            for i in range(1000)]
    await conn.executemany(f"INSERT INTO {TABLE} (id, label, amount, ref, at) VALUES ($1, $2, $3, $4, $5)", rows)
    count = await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id >= 100")
    expect(count, 1000, "row count after executemany")
    sample = await conn.fetchrow(f"SELECT id, label, amount, ref, at FROM {TABLE} WHERE id = $1", 100 + 737)
    expect(tuple(sample), rows[737], "sample row")


@check("copy_records_to_table of 10k records")
async def check_copy_in(conn):
    records = [(i, f"name {i} ✓", i * 0.5, TS + datetime.timedelta(minutes=i)) for i in range(10000)]
    status = await conn.copy_records_to_table(f"{TABLE}_copy", records=records,
                                              columns=["id", "name", "score", "at"])
    expect(status, "COPY 10000", "COPY status")
    got = await conn.fetchrow(f"SELECT count(*) AS n, sum(id) AS s, sum(score) AS sc FROM {TABLE}_copy")
    expect((got["n"], got["s"], got["sc"]), (10000, sum(range(10000)), sum(range(10000)) * 0.5), "aggregates")
    sample = await conn.fetchrow(f"SELECT * FROM {TABLE}_copy WHERE id = 4321")
    expect(tuple(sample), records[4321], "sample record")


@check("copy_from_query out")
async def check_copy_out(conn):
    chunks = []

    async def sink(data):
        chunks.append(bytes(data))

    status = await conn.copy_from_query(
        f"SELECT id, name FROM {TABLE}_copy WHERE id < $1 ORDER BY id", 1000,
        output=sink, format="csv",
    )
    expect(status, "COPY 1000", "COPY status")
    lines = b"".join(chunks).decode().splitlines()
    expect(len(lines), 1000, "CSV lines")
    expect(lines[999], "999,name 999 ✓", "last CSV line")
    chunks.clear()
    status = await conn.copy_from_table(f"{TABLE}_copy", output=sink, format="binary")
    expect(status, "COPY 10000", "binary COPY status")
    data = b"".join(chunks)
    assert data.startswith(b"PGCOPY\n\xff\r\n\x00"), f"binary COPY signature: {data[:11]!r}"


@check("transaction rollback")
async def check_rollback(conn):
    before = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f"INSERT INTO {TABLE} (id, label) VALUES ($1, $2)", 5, "rolled back")
    expect(await conn.fetchval(f"SELECT count(*) FROM {TABLE}"), before + 1, "count inside")
    await tr.rollback()
    expect(await conn.fetchval(f"SELECT count(*) FROM {TABLE}"), before, "count after rollback")

    class Boom(Exception):
        pass

    try:
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {TABLE} (id, label) VALUES ($1, $2)", 6, "rolled back too")
            raise Boom()
    except Boom:
        pass
    expect(await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id = 6"), 0, "context-manager rollback")
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {TABLE} (id, label) VALUES ($1, $2)", 7, "committed")
        try:
            async with conn.transaction():  # savepoint
                await conn.execute(f"INSERT INTO {TABLE} (id, label) VALUES ($1, $2)", 7, "dup")
        except asyncpg.UniqueViolationError:
            pass
    expect(await conn.fetchval(f"SELECT label FROM {TABLE} WHERE id = 7"), "committed", "savepoint")


@check("error then reuse")
async def check_error_reuse(conn):
    try:
        await conn.fetch("SELECT * FROM compat_no_such_table")
        raise AssertionError("query on a missing table succeeded")
    except asyncpg.UndefinedTableError as exc:
        expect(exc.sqlstate, "42P01", "SQLSTATE")
    try:
        await conn.fetchval("SELECT 1 / $1::int", 0)
        raise AssertionError("division by zero succeeded")
    except asyncpg.DivisionByZeroError:
        pass
    try:
        await conn.execute("SELECT 1; SELECT 1/0; SELECT 2")  # simple protocol, multi-statement
        raise AssertionError("multi-statement division by zero succeeded")
    except asyncpg.DivisionByZeroError:
        pass
    expect(await conn.fetchval("SELECT $1::text", "alive"), "alive", "after errors")
    stmt = await conn.prepare("SELECT $1::int4 + 1")
    expect(await stmt.fetchval(41), 42, "prepare after errors")


@check("cursor iteration over 50k rows in a transaction")
async def check_cursor(conn):
    async with conn.transaction():
        count = 0
        total = 0
        async for record in conn.cursor("SELECT g, repeat('y', 20) AS pad FROM generate_series(1, $1) g",
                                         50000, prefetch=1000):
            count += 1
            total += record["g"]
            if len(record["pad"]) != 20:
                raise AssertionError(f"bad pad {record['pad']!r}")
        expect((count, total), (50000, 50000 * 50001 // 2), "streamed rows")
        cur = await conn.cursor("SELECT g FROM generate_series(1, 100) g")
        first = await cur.fetch(10)
        expect([r["g"] for r in first], list(range(1, 11)), "explicit cursor fetch")
        await cur.forward(80)
        rest = await cur.fetch(100)
        expect([r["g"] for r in rest], list(range(91, 101)), "cursor after forward")


@check("cleanup")
async def check_cleanup(conn):
    await conn.execute(f"DROP TABLE {TABLE}, {TABLE}_copy")


async def main():
    try:
        conn = await connect()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        print(f"FAIL: connect: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        for name, fn in CHECKS:
            try:
                await asyncio.wait_for(fn(conn), timeout=120)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                print(f"FAIL: {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            print(f"ok: {name}", flush=True)
    finally:
        await conn.close(timeout=10)
    print(f"all {len(CHECKS)} asyncpg checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
