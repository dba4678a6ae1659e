#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, written into fuzz/corpus/<target>/.

Generated rather than committed: the SQL comes from the e2e adversarial
corpus (e2e/corpus/statements.yaml) and the policies from the e2e corpus and
the shipped examples, so the seeds follow them. Protocol messages, recording
lines and stream events are built here. Standard library only.
"""
import hashlib
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def cstr(s):
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def msg(ty, body=b""):
    return ty + struct.pack(">i", len(body) + 4) + body


# === SQL: every setup and sql block of the adversarial corpus ===

def corpus_sql():
    path = os.path.join(ROOT, "e2e", "corpus", "statements.yaml")
    lines = open(path, encoding="utf-8").read().split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        t = line.lstrip()
        key = next((k for k in ("sql:", "setup:") if t.startswith(k)), None)
        i += 1
        if key is None:
            continue
        rest = t[len(key):].strip()
        indent = len(line) - len(t)
        if rest in ("|-", "|"):
            block = []
            while i < len(lines):
                n = lines[i]
                if n.strip() and len(n) - len(n.lstrip()) <= indent:
                    break
                block.append(n.strip())
                i += 1
            text = "\n".join(block).strip()
        else:
            text = rest.strip("'\"")
        if text:
            out.append(text)
    return out


def sql_seeds():
    texts = corpus_sql()
    for n, text in enumerate(texts):
        for target in ("analyze_sql", "normalize_differential"):
            write(target, "corpus-%03d" % n, text)
    return len(texts)


# === wire ===

def wire_seeds():
    fe = b"".join([
        msg(b"Q", cstr("SELECT 1")),
        msg(b"P", cstr("s1") + cstr("SELECT $1::int") + struct.pack(">hI", 1, 23)),
        msg(b"B", cstr("p1") + cstr("s1") + struct.pack(">hh", 1, 0) + struct.pack(">hi", 1, 2)
            + b"42" + struct.pack(">hh", 1, 1)),
        msg(b"D", b"P" + cstr("p1")),
        msg(b"E", cstr("p1") + struct.pack(">i", 0)),
        msg(b"C", b"S" + cstr("s1")),
        msg(b"S"), msg(b"H"),
        msg(b"p", cstr("secret")),
        msg(b"d", b"1\t2\n"), msg(b"c"),
        msg(b"X"),
    ])
    row = struct.pack(">h", 2) + struct.pack(">i", 3) + b"abc" + struct.pack(">i", -1)
    desc = struct.pack(">h", 1) + cstr("id") + struct.pack(">IhIhih", 100, 1, 23, 4, -1, 0)
    err = b"".join(bytes([c]) + cstr(v) for c, v in
                   [(ord("S"), "ERROR"), (ord("V"), "ERROR"), (ord("C"), "22P02"),
                    (ord("M"), "invalid input syntax for type integer: \"4929\""),
                    (ord("P"), "8")]) + b"\0"
    be = b"".join([
        msg(b"R", struct.pack(">i", 10) + cstr("SCRAM-SHA-256") + b"\0"),
        msg(b"R", struct.pack(">i", 11) + b"r=abc,s=c2FsdA==,i=4096"),
        msg(b"R", struct.pack(">i", 5) + b"salt"),
        msg(b"R", struct.pack(">i", 0)),
        msg(b"S", cstr("server_version") + cstr("15.4")),
        msg(b"K", struct.pack(">ii", 1234, 5678)),
        msg(b"Z", b"I"),
        msg(b"T", desc),
        msg(b"t", struct.pack(">hI", 1, 23)),
        msg(b"D", row),
        msg(b"C", cstr("SELECT 1")),
        msg(b"E", err), msg(b"N", err),
        msg(b"1"), msg(b"2"), msg(b"n"), msg(b"I"),
    ])
    # Mode byte: bit 0 is the direction, the rest the piece size.
    for mode in (0, 6, 64):
        write("wire_frame", "frontend-%d" % mode, bytes([mode]) + fe)
    for mode in (1, 7, 65):
        write("wire_frame", "backend-%d" % mode, bytes([mode]) + be)


def startup_seeds():
    def startup(params, version=196608):
        body = struct.pack(">i", version) + b"".join(cstr(k) + cstr(v) for k, v in params) + b"\0"
        return struct.pack(">i", len(body) + 4) + body
    write("startup_packet", "psql", startup([("user", "agent"), ("database", "shop"),
                                             ("application_name", "psql"),
                                             ("client_encoding", "UTF8")]))
    write("startup_packet", "jdbc", startup([("user", "a"), ("database", "d"),
                                             ("DateStyle", "ISO"), ("TimeZone", "UTC"),
                                             ("extra_float_digits", "2"),
                                             ("_pq_.protocol_managed", "1")], 196610))
    write("startup_packet", "options", startup([("user", "a"), ("options", "-c x=y")]))
    write("startup_packet", "ssl", struct.pack(">ii", 8, 80877103))
    write("startup_packet", "gss", struct.pack(">ii", 8, 80877104))
    write("startup_packet", "cancel", struct.pack(">iiii", 16, 80877102, 42, 7))


def mask_seeds():
    # head: 2 columns, tainted, scan; then 3 bytes per column; then the row.
    desc = bytes([1, 1, 0,   # public.t.c1 text
                  1, 2, 5])  # public.t.c2 json
    row = struct.pack(">h", 2)
    for v in (b"4929123456789012", b"\"someone@example.com\""):
        row += struct.pack(">i", len(v)) + v
    write("mask_data_row", "partial-email", bytes([1 | 8 | 16]) + desc + row)
    desc = bytes([1, 3, 8, 0, 0, 0, 2, 1, 0])  # c3 int4 hash, computed text, plain
    row = struct.pack(">h", 3)
    for v in (b"12345", b"card 4929 1234 5678 9012 ssn 123-45-6789", None):
        row += struct.pack(">i", -1) if v is None else struct.pack(">i", len(v)) + v
    write("mask_data_row", "hash-scan", bytes([2 | 16]) + desc + row)


def seal(record):
    body = json.dumps(record, separators=(",", ":"))
    h = hashlib.sha256(body.encode()).hexdigest()
    return body[:-1] + ',"hash":"' + h + '"}', h


def recording_seeds():
    prev, lines, last = "0" * 64, [], {}
    events = [
        ("a", {"kind": "sessionStart", "subject": "dev", "method": "localTrust", "claims": [],
               "client": "127.0.0.1:5", "applicationName": "psql", "policy": "ns/p",
               "policyVersion": "0123456789abcdef", "database": "shop"}),
        ("a", {"kind": "statement", "n": 1, "text": "SELECT 1", "parameters": [],
               "verdict": "allow"}),
        ("a", {"kind": "result", "n": 1, "durationUs": 10, "rows": 1, "tag": "SELECT 1",
               "columns": ["x"], "sample": [["1"]]}),
        ("a", {"kind": "statement", "n": 2, "text": "DROP TABLE t", "parameters": [],
               "verdict": "deny", "reason": "denied"}),
        ("a", {"kind": "sessionEnd", "reason": "client closed", "statements": 2}),
    ]
    for seq, (session, ev) in enumerate(events, 1):
        r = {"seq": seq, "at": "2026-01-01T00:00:00.000000Z", "session": session}
        r.update(ev)
        r["prev"] = prev
        r["sessionPrev"] = last.get(session, "")
        line, h = seal(r)
        lines.append(line)
        prev, last[session] = h, h
    log = "\n".join(lines) + "\n"
    head = json.dumps({"seq": len(lines), "hash": prev})
    # mode 0: log only; mode 2: head line, then the log.
    write("recording_verify", "log", b"\0" + log.encode())
    write("recording_verify", "log-head", b"\2" + (head + "\n" + log).encode())
    write("recording_verify", "log-torn", b"\0" + log[:-20].encode())
    # mode 1: records described by the input (0xff-separated), after the flip.
    chunks = [b"\x05\x00\x01", b"\x00start", b"\x00SELECT 1", b"\x08rows", b"\x01other",
              b"\x0ccut", b"\x0dend"]
    write("recording_verify", "sealed", b"\1" + b"\xff".join(chunks))


def policy_seeds():
    secret = open(os.path.join(ROOT, "manifests", "examples", "credentials-secret.yaml")).read()
    corpus = open(os.path.join(ROOT, "e2e", "corpus", "policy.yaml")).read()
    corpus_secret = ("---\napiVersion: v1\nkind: Secret\nmetadata: {name: shop-cred, "
                     "namespace: default}\nstringData: {username: app, password: pw}\n")
    write("policy_yaml", "corpus", corpus + corpus_secret)
    ex = os.path.join(ROOT, "manifests", "examples")
    for name in sorted(os.listdir(ex)):
        if name.endswith("-policy.yaml") or name.endswith("-identity.yaml"):
            write("policy_yaml", name, open(os.path.join(ex, name)).read() + "\n---\n" + secret)


def stream_seeds():
    spec = {
        "identity": {"pod": {}},
        "database": {"host": "db", "port": 5432, "name": "shop", "credentialsSecret": "c"},
        "defaultAction": "Deny",
        "rules": [{"name": "read", "action": "Allow", "statements": ["SELECT"],
                   "tables": ["public.*"]}],
        "masking": [{"columns": ["public.customers.card"], "strategy": "Partial",
                     "keepLast": 4}],
    }
    snap = {"type": "Snapshot", "snapshot": {
        "version": 3,
        "policies": [{"namespace": "ci", "name": "p", "spec": spec,
                      "credential": {"username": "app", "password": "pw"}}],
        "pod": {"namespace": "ci", "name": "job-1", "uid": "u", "serviceAccount": "sa"},
    }}
    lines = [json.dumps({"type": "Heartbeat"}), json.dumps(snap),
             json.dumps({"type": "SomethingNew", "x": 1}), ""]
    write("config_stream", "snapshot", b"\x07" + "\r\n".join(lines).encode())
    write("config_stream", "heartbeats", b"\x01" + b'{"type":"Heartbeat"}\n' * 4)


def main():
    n = sql_seeds()
    wire_seeds()
    startup_seeds()
    mask_seeds()
    recording_seeds()
    policy_seeds()
    stream_seeds()
    print("seeds written to %s (%d SQL texts)" % (OUT, n), file=sys.stderr)


if __name__ == "__main__":
    main()
