#!/usr/bin/env python3
"""sendfile against read-and-write on Multipath TCP (and TCP for reference), on loopback.

Linux's MPTCP send path copies every byte into its own buffers (it keeps them to reinject on
another subflow), so sendfile(2) on an MPTCP socket is not zero-copy. The question for roam is
whether it still beats pread + send. For each transport the two modes run in interleaved
rounds: a sender process pinned to core 0 sends FILE_MIB of a page-cached file, a receiver
pinned to core 1 reads it to nowhere; the sender's CPU time (user + system) and the wall time
are measured. Prints the median of each and the median of the per-round ratios.

    scripts/mptcp-sendfile.py [ROUNDS] [FILE_MIB]      # defaults: 5 rounds, 1024 MiB
"""

import os
import socket
import statistics
import sys
import tempfile
import time

IPPROTO_MPTCP = 262
CHUNK = 1 << 20  # roam's sendfile calls and read-loop chunks are up to 1 MiB / 256 KiB
READ_CHUNK = 256 << 10


def pin(core):
    try:
        os.sched_setaffinity(0, {core})
    except OSError:
        pass


def receiver(port, proto, ready_w):
    pin(1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    s.connect(("127.0.0.1", port))
    os.write(ready_w, b"c")
    buf = bytearray(1 << 20)
    while s.recv_into(buf):
        pass
    s.close()
    os._exit(0)


def one(path, size, proto, mode):
    """Sends the file once; returns (seconds, sender CPU seconds)."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port = ls.getsockname()[1]
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        ls.close()
        receiver(port, proto, ready_w)
    conn, _ = ls.accept()
    os.read(ready_r, 1)
    pin(0)
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    t0, c0 = time.perf_counter(), os.times()
    off = 0
    if mode == "sendfile":
        while off < size:
            off += os.sendfile(conn.fileno(), fd, off, min(CHUNK, size - off))
    else:
        while off < size:
            n = os.preadv(fd, [view], off)
            conn.sendall(view[:n])
            off += n
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)  # the receiver's close: everything arrived
    t1, c1 = time.perf_counter(), os.times()
    os.close(fd)
    conn.close()
    ls.close()
    os.waitpid(child, 0)
    os.close(ready_r)
    os.close(ready_w)
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return t1 - t0, cpu


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    size = mib << 20
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        block = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(block)
        f.flush()
        with open(f.name, "rb") as warm:  # into the page cache
            while warm.read(1 << 24):
                pass
        gb = size / 1e9
        print(f"<!-- {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, {os.cpu_count()} cores, "
              f"{os.uname().release}, {mib} MiB, {rounds} interleaved rounds -->")
        print("| transport | mode | GB/s | sender CPU s/GB |")
        print("|---|---|---|---|")
        for name, proto in (("TCP", socket.IPPROTO_TCP), ("MPTCP", IPPROTO_MPTCP)):
            res = {"sendfile": [], "read+write": []}
            for r in range(rounds):
                modes = ["sendfile", "read+write"]
                if r % 2:
                    modes.reverse()
                for mode in modes:
                    secs, cpu = one(f.name, size, proto, mode)
                    res[mode].append((gb / secs, cpu / gb))
            for mode, vals in res.items():
                print(f"| {name} | {mode} | {statistics.median(v[0] for v in vals):.2f} | "
                      f"{statistics.median(v[1] for v in vals):.3f} |")
            cpu_ratio = statistics.median(
                a[1] / b[1] for a, b in zip(res["sendfile"], res["read+write"]))
            speed_ratio = statistics.median(
                a[0] / b[0] for a, b in zip(res["sendfile"], res["read+write"]))
            print(f"| {name} | sendfile / read+write (median of ratios) | {speed_ratio:.2f} | "
                  f"{cpu_ratio:.2f} |")


if __name__ == "__main__":
    main()
