#!/usr/bin/env python3
"""Holds idle keep-alive connections open, for measuring a server's memory per idle connection.

usage: idle-conns.py HOST:PORT N IDS_FILE [FILE]

Opens N connections; each sends one request (GET /<id>/<FILE>, Range: bytes=0-, IDs from
IDS_FILE in rotation) and reads the whole response, then stays open and silent. Prints "ready"
once every response has arrived, then holds the connections until stdin closes or the process
is killed. With IDS_FILE "-" the connections send nothing (bare idle connections).
"""
import socket
import sys


def read_response(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("the server closed a connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("the server closed a connection mid-body")
        body += chunk


def main():
    addr, n, ids_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    name = sys.argv[4] if len(sys.argv) > 4 else "f1k"
    host, _, port = addr.rpartition(":")
    ids = [] if ids_file == "-" else [l.strip() for l in open(ids_file) if l.strip()]
    conns = []
    # In batches, each answered before the next opens: a server's accept queue never
    # overflows (a dropped SYN costs the client a second or more before it tries again).
    batch = 256
    for first in range(0, n, batch):
        opened = []
        for i in range(first, min(first + batch, n)):
            s = socket.create_connection((host, int(port)))
            opened.append(s)
            if ids:
                s.sendall(
                    f"GET /{ids[i % len(ids)]}/{name} HTTP/1.1\r\nHost: bench\r\n"
                    f"Range: bytes=0-\r\n\r\n".encode()
                )
        if ids:
            for s in opened:
                read_response(s)
        conns.extend(opened)
    print("ready", flush=True)
    sys.stdin.read()


main()
