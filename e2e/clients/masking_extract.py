#!/usr/bin/env python3
"""Try to extract masked values through pgwarden with a real driver.

Usage: masking_extract.py psycopg|asyncpg

Connects with the libpq environment (PGHOST, PGPORT, ...), runs every
attempt in text and in binary result format, each three times on one
server-side prepared statement (so re-executions carry no Describe of the
driver's own), and prints one JSON line per execution:
  {"attempt": ..., "binary": ..., "run": n, "rows": [...]}   or
  {"attempt": ..., "binary": ..., "run": n, "error": ..., "sqlstate": ...}
The Rust test (e2e/tests/masking.rs) greps the output for the raw values.
"""

import asyncio
import json
import sys

ATTEMPTS = [
    ("direct", "SELECT id, name, card_number, email, ssn, notes FROM customers ORDER BY id"),
    ("alias", "SELECT card_number AS harmless, name AS card_number FROM customers"),
    ("expression", "SELECT upper(card_number), card_number || '' FROM customers"),
    ("cast", "SELECT card_number::bigint FROM customers"),
    ("whole row", "SELECT c FROM customers c"),
    ("to_jsonb", "SELECT to_jsonb(c) FROM customers c"),
    ("aggregate", "SELECT string_agg(email, ','), array_agg(card_number) FROM customers"),
    ("jsonb column", "SELECT profile, profile->>'pin' FROM customers"),
    ("view", "SELECT * FROM customer_cards"),
    ("union", "SELECT card_number FROM customers UNION ALL SELECT 'x'"),
    ("cte", "WITH t AS (SELECT * FROM customers) SELECT * FROM t"),
    ("error echo", "SELECT card_number::int FROM customers"),
]


def emit(**kw):
    print(json.dumps(kw, default=str), flush=True)


def run_psycopg():
    import psycopg

    with psycopg.connect(autocommit=True) as conn:
        for binary in (False, True):
            for name, sql in ATTEMPTS:
                for run in range(3):
                    try:
                        cur = conn.cursor(binary=binary)
                        cur.execute(sql, prepare=True)
                        emit(attempt=name, binary=binary, run=run, rows=cur.fetchall())
                    except psycopg.Error as e:
                        emit(attempt=name, binary=binary, run=run, error=str(e),
                             sqlstate=e.sqlstate,
                             detail=getattr(e.diag, "message_detail", None))
        # Pipeline mode: several statements in flight, one failing in the
        # middle; results before and after it are still masked and the
        # session survives.
        cursors = []
        try:
            with conn.pipeline() as p:
                for sql in ("SELECT card_number FROM customers",
                            "SELECT card_number::int FROM customers",
                            "SELECT email FROM customers"):
                    cur = conn.cursor()
                    cur.execute(sql)
                    cursors.append(cur)
                p.sync()
        except psycopg.Error as e:
            emit(attempt="pipeline", binary=False, run=0, error=str(e), sqlstate=e.sqlstate)
        try:
            emit(attempt="pipeline", binary=False, run=1, rows=cursors[0].fetchall())
        except psycopg.Error as e:
            emit(attempt="pipeline", binary=False, run=1, error=str(e), sqlstate=e.sqlstate)
        emit(attempt="after pipeline", binary=False, run=0,
             rows=conn.execute("SELECT card_number, email FROM customers").fetchall())
        # COPY in every format: refused, never raw.
        for fmt in ("text", "csv", "binary"):
            try:
                with conn.cursor() as cur:
                    with cur.copy(f"COPY customers TO STDOUT (FORMAT {fmt})") as copy:
                        data = b"".join(bytes(b) for b in copy)
                emit(attempt=f"copy {fmt}", binary=False, run=0, rows=[data.hex(), repr(data)])
            except psycopg.Error as e:
                emit(attempt=f"copy {fmt}", binary=False, run=0, error=str(e), sqlstate=e.sqlstate)


async def run_asyncpg_async():
    import asyncpg

    conn = await asyncpg.connect()
    try:
        for name, sql in ATTEMPTS:
            try:
                stmt = await conn.prepare(sql)
            except asyncpg.PostgresError as e:
                emit(attempt=name, binary=True, run=0, error=str(e), sqlstate=e.sqlstate)
                continue
            for run in range(3):
                try:
                    rows = await stmt.fetch()
                    emit(attempt=name, binary=True, run=run, rows=[list(r.values()) for r in rows])
                except asyncpg.PostgresError as e:
                    emit(attempt=name, binary=True, run=run, error=str(e), sqlstate=e.sqlstate,
                         detail=getattr(e, "detail", None))
        try:
            out = []
            await conn.copy_from_query("SELECT card_number FROM customers",
                                       output=lambda b: out.append(b), format="binary")
            emit(attempt="copy_from_query", binary=True, run=0, rows=[repr(out)])
        except asyncpg.PostgresError as e:
            emit(attempt="copy_from_query", binary=True, run=0, error=str(e), sqlstate=e.sqlstate)
    finally:
        await conn.close()


def main():
    driver = sys.argv[1] if len(sys.argv) > 1 else ""
    if driver == "psycopg":
        run_psycopg()
    elif driver == "asyncpg":
        asyncio.run(run_asyncpg_async())
    else:
        print("usage: masking_extract.py psycopg|asyncpg", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
