#!/usr/bin/env python3
"""Small servers and clients for the outbound end-to-end tests (tests/outbound_e2e.rs).

Run inside test namespaces only (`ip netns exec NS python3 nettool.py CMD ...`). Every client
prints one JSON object on its last stdout line; servers print one JSON line per connection.
Nothing here sends to any address it was not given on the command line.
"""
import asyncio
import errno
import hashlib
import json
import random
import resource
import socket
import struct
import sys
import threading
import time

CHUNK = 1 << 20


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_BASE = None


def base_block():
    global _BASE
    if _BASE is None:
        _BASE = random.Random(0x5EED).randbytes(CHUNK)
    return _BASE


def gen(n):
    """The deterministic test stream: n bytes, 1 MiB blocks of one pseudo-random block, each
    rotated differently (so lost, duplicated or reordered blocks change the hash)."""
    base = base_block()
    i = 0
    while n > 0:
        k = (i * 7919) % CHUNK
        block = base[k:] + base[:k]
        if n < CHUNK:
            block = block[:n]
        n -= len(block)
        i += 1
        yield block


def gen_sha(n):
    h = hashlib.sha256()
    for b in gen(n):
        h.update(b)
    return h.hexdigest()


def classify(e):
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, BrokenPipeError):
        return "EPIPE"
    if isinstance(e, socket.timeout) and getattr(e, "errno", None) is None:
        return "timeout"
    if isinstance(e, OSError) and e.errno is not None:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__ + ": " + str(e)


def out(obj):
    print(json.dumps(obj), flush=True)


def read_to_eof(sock, h=None):
    n = 0
    while True:
        b = sock.recv(CHUNK)
        if not b:
            return n
        n += len(b)
        if h is not None:
            h.update(b)


def listener(bind, port, backlog=4096):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, int(port)))
    s.listen(backlog)
    return s


def serve_threads(bind, port, handler):
    s = listener(bind, port)
    while True:
        c, peer = s.accept()
        threading.Thread(target=guarded, args=(handler, c, peer), daemon=True).start()


def guarded(handler, c, peer):
    try:
        handler(c, peer)
    except Exception as e:  # report, keep serving
        out({"peer": peer[0], "error": classify(e)})
    finally:
        try:
            c.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------


def srv_tcp_echo(bind, port):
    raise_nofile()

    async def handle(r, w):
        try:
            while True:
                b = await r.read(65536)
                if not b:
                    break
                w.write(b)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def main():
        server = await asyncio.start_server(
            handle, bind, int(port), backlog=4096, reuse_address=True
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def srv_tcp_sink(bind, port):
    """Reads each connection to EOF, answers `COUNT SHA256\\n`, closes."""

    def h(c, peer):
        t0 = time.monotonic()
        hs = hashlib.sha256()
        n = read_to_eof(c, hs)
        c.sendall(("%d %s\n" % (n, hs.hexdigest())).encode())
        c.shutdown(socket.SHUT_WR)
        out({"peer": peer[0], "got": n, "sha": hs.hexdigest(), "secs": time.monotonic() - t0})

    serve_threads(bind, port, h)


def srv_tcp_source(bind, port, nbytes):
    """Sends the deterministic stream of NBYTES on each connection, then closes."""
    nbytes = int(nbytes)

    def h(c, peer):
        t0 = time.monotonic()
        hs = hashlib.sha256()
        for b in gen(nbytes):
            hs.update(b)
            c.sendall(b)
        c.shutdown(socket.SHUT_WR)
        # Wait for the client's FIN so our close cannot turn into a RST.
        c.settimeout(600)
        read_to_eof(c)
        out({"peer": peer[0], "sent": nbytes, "sha": hs.hexdigest(), "secs": time.monotonic() - t0})

    serve_threads(bind, port, h)


def srv_tcp_halfclose(bind, port, reply_bytes, delay="0"):
    """Reads to EOF (the client half-closed), then (DELAY seconds later) replies `COUNT SHA\\n`
    + REPLY_BYTES of the stream, then closes."""
    reply_bytes, delay = int(reply_bytes), float(delay)

    def h(c, peer):
        hs = hashlib.sha256()
        n = read_to_eof(c, hs)
        time.sleep(delay)
        c.sendall(("%d %s\n" % (n, hs.hexdigest())).encode())
        for b in gen(reply_bytes):
            c.sendall(b)
        c.shutdown(socket.SHUT_WR)
        out({"peer": peer[0], "got": n, "sha": hs.hexdigest(), "replied": reply_bytes})

    serve_threads(bind, port, h)


def srv_tcp_serverfirst(bind, port, nbytes, delay="0"):
    """Sends NBYTES of the stream and half-closes first; then (after DELAY seconds, a slow
    reader) reads the client's data to EOF and reports it."""
    nbytes, delay = int(nbytes), float(delay)

    def h(c, peer):
        for b in gen(nbytes):
            c.sendall(b)
        c.shutdown(socket.SHUT_WR)
        time.sleep(delay)
        hs = hashlib.sha256()
        c.settimeout(60)
        n = read_to_eof(c, hs)
        out({"peer": peer[0], "sent": nbytes, "got": n, "sha": hs.hexdigest()})

    serve_threads(bind, port, h)


def srv_tcp_rst(bind, port):
    """Reads up to 5 bytes, then closes with SO_LINGER 0 (a RST)."""

    def h(c, peer):
        c.settimeout(5)
        got = b""
        try:
            while len(got) < 5:
                b = c.recv(5 - len(got))
                if not b:
                    break
                got += b
        except OSError:
            pass
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        out({"peer": peer[0], "got": got.decode("latin-1"), "sent_rst": True})

    serve_threads(bind, port, h)


def srv_tcp_observe(bind, port):
    """Reads until EOF or error and reports which it was (to see a client's RST)."""

    def h(c, peer):
        c.settimeout(30)
        n = 0
        try:
            n = read_to_eof(c)
            res = "eof"
        except Exception as e:
            res = classify(e)
        out({"peer": peer[0], "got": n, "result": res})

    serve_threads(bind, port, h)


def srv_udp_echo(bind, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((bind, int(port)))
    while True:
        b, peer = s.recvfrom(65535)
        s.sendto(b, peer)
        out({"peer": peer[0], "port": peer[1], "len": len(b)})


def burst_sizes(spec):
    """`1200x3 0 3000` -> [1200, 1200, 1200, 0, 3000]."""
    sizes = []
    for part in spec:
        size, _, count = part.partition("x")
        sizes += [int(size)] * int(count or 1)
    return sizes


def burst_datagram(i, size):
    """Datagram i of a burst: its index (when there is room), then bytes derived from it."""
    body = struct.pack("!I", i) + bytes((i * 7 + j) % 251 for j in range(max(0, size - 4)))
    return body[:size]


def large_receive_buffer(s):
    """16 MiB to receive a whole burst into: SO_RCVBUFFORCE as root, else as much as
    SO_RCVBUF may take."""
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)


def send_burst(s, sizes, dst):
    """Sends the burst of `sizes` to `dst`: each run of one size at once with UDP_SEGMENT
    where the kernel takes it (so that the receiver finds the whole run queued), else one by
    one, a pause after each run. Returns how many went out in runs."""
    i, segmented = 0, 0
    while i < len(sizes):
        size = sizes[i]
        run = 1
        while (i + run < len(sizes) and sizes[i + run] == size and run < 32
               and (run + 1) * size <= 65000):
            run += 1
        data = b"".join(burst_datagram(i + k, size) for k in range(run))
        sent = False
        if run > 1 and size > 0:
            try:
                s.sendmsg([data], [(socket.SOL_UDP, 103, struct.pack("=H", size))], 0, dst)
                sent, segmented = True, segmented + run
            except OSError:
                pass
        if not sent:
            for k in range(run):
                s.sendto(burst_datagram(i + k, size), dst)
        i += run
        time.sleep(0.002)  # pacing: a run at a time into the receiving side's queues
    return segmented


def srv_udp_burst(bind, port):
    """Answers each request (`SIZE[xCOUNT] ...`) with a burst of such datagrams, numbered in
    order; each run of equal sizes is sent at once where the kernel takes UDP_SEGMENT (so that
    the receiver finds the whole run queued), else one by one."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, int(port)))
    while True:
        req, peer = s.recvfrom(65535)
        sizes = burst_sizes(req.decode().split())
        segmented = send_burst(s, sizes, peer)
        out({"peer": peer[0], "sent": len(sizes), "segmented": segmented})


def srv_udp_collect(bind, port):
    """Takes bursts (see cli_udp_burst_send): datagram i must be burst_datagram(i, size); an
    `END n` datagram answers its sender with the verdict on the n before it, and starts over."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    large_receive_buffer(s)
    s.bind((bind, int(port)))
    got, bad = [], []
    while True:
        b, peer = s.recvfrom(65535)
        if b.startswith(b"END "):
            n = int(b[4:])
            verdict = {"expected": n, "received": len(got), "bad": bad[:10],
                       "ok": len(got) == n and not bad}
            s.sendto(json.dumps(verdict).encode(), peer)
            out(verdict)
            got, bad = [], []
            continue
        i = len(got)
        if b != burst_datagram(i, len(b)):
            bad.append({"at": i, "len": len(b), "head": b[:8].hex()})
        got.append(len(b))


# ------------------------------------------------------------------------------------------
# Clients
# ------------------------------------------------------------------------------------------


def cli_connect(host, port, timeout):
    t0 = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(float(timeout))
    try:
        s.connect((host, int(port)))
        res = "connected"
    except Exception as e:
        res = classify(e)
    out({"result": res, "elapsed": time.monotonic() - t0})


def cli_connect_many(host, port, n, timeout):
    n = int(n)
    results = [None] * n
    t0 = time.monotonic()

    def one(i):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(float(timeout))
        try:
            s.connect((host, int(port)))
            res = "connected"
        except Exception as e:
            res = classify(e)
        results[i] = {"result": res, "elapsed": time.monotonic() - t0}
        s.close()

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out({"results": results, "elapsed": time.monotonic() - t0})


def cli_connect_reuse(host, port, n, secs):
    """N connections one after another (connect, 1 byte each way, close: the client closes
    first, so its port goes to TIME_WAIT). A connect refused a local port (EADDRNOTAVAIL: every
    port of a narrow ip_local_port_range in TIME_WAIT) is retried until SECS have passed.
    "ts": whether the guest's kernel negotiated timestamps on each (TCP_INFO options bit 0)."""
    n, deadline = int(n), time.monotonic() + float(secs)
    done, ts, retries, errors, ports = 0, [], 0, [], []
    t0 = time.monotonic()
    while done < n and time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(3.0)
        try:
            s.connect((host, int(port)))
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise OSError("no echo")
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
            ts.append(bool(info[5] & 1))
            ports.append(s.getsockname()[1])
            done += 1
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                retries += 1
                time.sleep(0.02)
            else:
                errors.append(classify(e))
                if len(errors) >= 5:
                    break
        finally:
            s.close()
    out({"ok": done, "ts": ts, "retries": retries, "errors": errors, "ports": ports,
         "elapsed": time.monotonic() - t0})


def cli_send(host, port, nbytes):
    """Sends NBYTES of the stream, half-closes, reads the sink's `COUNT SHA` answer."""
    nbytes = int(nbytes)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.settimeout(120)
    t0 = time.monotonic()
    hs = hashlib.sha256()
    for b in gen(nbytes):
        hs.update(b)
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        reply += b
    secs = time.monotonic() - t0
    out({"sent": nbytes, "sha": hs.hexdigest(), "reply": reply.decode("latin-1").strip(),
         "secs": secs, "mib_per_s": nbytes / (1 << 20) / max(secs, 1e-9)})


def cli_recv(host, port, nbytes):
    """Reads the source's stream to EOF; reports count, sha and the expected sha."""
    nbytes = int(nbytes)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.settimeout(120)
    t0 = time.monotonic()
    hs = hashlib.sha256()
    n = read_to_eof(s, hs)
    secs = time.monotonic() - t0
    s.close()
    out({"got": n, "sha": hs.hexdigest(), "expected_sha": gen_sha(nbytes), "secs": secs,
         "mib_per_s": n / (1 << 20) / max(secs, 1e-9)})


def cli_halfclose(host, port, nbytes, reply_bytes, pause="0"):
    """Sends NBYTES, (PAUSE seconds later) half-closes, reads the reply to EOF."""
    nbytes, reply_bytes, pause = int(nbytes), int(reply_bytes), float(pause)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.settimeout(60)
    hs = hashlib.sha256()
    for b in gen(nbytes):
        hs.update(b)
        s.sendall(b)
    time.sleep(pause)
    s.shutdown(socket.SHUT_WR)
    data = bytearray()
    while True:
        b = s.recv(CHUNK)
        if not b:
            break
        data += b
    line, _, body = bytes(data).partition(b"\n")
    out({"sent": nbytes, "sent_sha": hs.hexdigest(), "header": line.decode("latin-1"),
         "body_len": len(body), "body_sha": hashlib.sha256(body).hexdigest(),
         "expected_body_sha": gen_sha(reply_bytes)})


def cli_serverfirst(host, port, nbytes, send_bytes):
    nbytes, send_bytes = int(nbytes), int(send_bytes)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.settimeout(60)
    hs = hashlib.sha256()
    n = read_to_eof(s, hs)
    # The server's write side is closed; ours is still open: send after its FIN.
    hs2 = hashlib.sha256()
    for b in gen(send_bytes):
        hs2.update(b)
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
    tail = read_to_eof(s)
    out({"got": n, "sha": hs.hexdigest(), "expected_sha": gen_sha(nbytes), "sent": send_bytes,
         "sent_sha": hs2.hexdigest(), "after_eof_got": tail})


def cli_rst(host, port):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.settimeout(10)
    s.sendall(b"hello")
    try:
        b = s.recv(4096)
        res = "eof" if not b else "data"
    except Exception as e:
        res = classify(e)
    out({"result": res})


def cli_abort(host, port):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"hello")
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    out({"result": "aborted"})


def cli_echo_many(host, port, n, size, timeout):
    """N concurrent connections, each sends SIZE distinct bytes and expects them back."""
    raise_nofile()
    n, size, timeout = int(n), int(size), float(timeout)

    async def one(i):
        payload = random.Random(i).randbytes(size)
        t0 = time.monotonic()
        try:
            r, w = await asyncio.open_connection(host, int(port))
        except Exception as e:
            return {"i": i, "stage": "connect", "error": classify(e)}
        try:
            async def writer():
                w.write(payload)
                await w.drain()
            wt = asyncio.create_task(writer())
            got = await r.readexactly(size)
            await wt
            w.write_eof()
            rest = await r.read()
            ok = got == payload and rest == b""
            return {"i": i, "ok": ok, "secs": time.monotonic() - t0,
                    "error": None if ok else "mismatch (extra %d)" % len(rest)}
        except asyncio.IncompleteReadError as e:
            return {"i": i, "stage": "read", "error": "short read %d/%d" % (len(e.partial), size)}
        except Exception as e:
            return {"i": i, "stage": "transfer", "error": classify(e)}
        finally:
            w.close()

    async def main():
        t0 = time.monotonic()
        try:
            res = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout)
        except asyncio.TimeoutError:
            return {"ok": 0, "n": n, "error": "overall timeout", "secs": time.monotonic() - t0}
        bad = [r for r in res if not r.get("ok")]
        return {"ok": n - len(bad), "n": n, "secs": time.monotonic() - t0,
                "max_conn_secs": max((r.get("secs", 0) for r in res), default=0),
                "failures": bad[:20], "failure_count": len(bad)}

    out(asyncio.run(main()))


def cli_echo_rounds(host, port, size, rounds, pause):
    """One connection: ROUNDS times send SIZE distinct bytes and read them back, with PAUSE
    seconds of silence between rounds (long enough for usernet to release an idle
    connection's buffers)."""
    size, rounds, pause = int(size), int(rounds), float(pause)
    c = socket.create_connection((host, int(port)), timeout=30)
    done = []
    try:
        for i in range(rounds):
            if i:
                time.sleep(pause)
            payload = random.Random(1000 + i).randbytes(size)
            t = threading.Thread(target=c.sendall, args=(payload,))
            t.start()
            got = bytearray()
            while len(got) < size:
                b = c.recv(min(1 << 20, size - len(got)))
                if not b:
                    break
                got += b
            t.join()
            done.append({"round": i, "ok": bytes(got) == payload, "got": len(got)})
    except Exception as e:
        out({"ok": False, "rounds": done, "error": classify(e)})
        return
    finally:
        c.close()
    out({"ok": all(r["ok"] for r in done) and len(done) == rounds, "rounds": done})


def cli_udp_echo(host, port, sizes, bind_port=0):
    """For each size: send a distinct datagram, expect it back byte-identical from HOST:PORT."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", int(bind_port)))
    s.settimeout(2)
    results = []
    for size in sizes:
        size = int(size)
        payload = random.Random(size).randbytes(size)
        r = {"size": size, "ok": False, "attempts": 0}
        for attempt in range(3):
            r["attempts"] = attempt + 1
            try:
                s.sendto(payload, (host, int(port)))
            except Exception as e:
                r["error"] = "send: " + classify(e)
                break
            try:
                while True:
                    b, peer = s.recvfrom(65535)
                    if b == payload:
                        break
                    r["stray"] = r.get("stray", 0) + 1
                r["from"] = "%s:%d" % peer
                r["ok"] = peer == (host, int(port))
                if not r["ok"]:
                    r["error"] = "reply from the wrong source"
                break
            except Exception as e:
                r["error"] = classify(e)
        results.append(r)
    out({"local_port": s.getsockname()[1], "results": results})


def cli_udp_burst(host, port, bind_port, *spec):
    """Asks HOST:PORT for a burst (see srv_udp_burst) and checks what arrives: every datagram,
    in order, each byte as sent."""
    sizes = burst_sizes(spec)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    large_receive_buffer(s)
    s.bind(("0.0.0.0", int(bind_port)))
    s.settimeout(5)
    s.sendto(" ".join(spec).encode(), (host, int(port)))
    got, bad, stray = 0, [], 0
    try:
        while got < len(sizes):
            b, peer = s.recvfrom(65535)
            if peer != (host, int(port)):
                stray += 1
                continue
            want = burst_datagram(got, sizes[got])
            if b != want:
                bad.append({"index": got, "want_len": len(want), "got_len": len(b),
                            "got_head": b[:8].hex()})
                if len(bad) > 10:
                    break
            got += 1
    except socket.timeout:
        pass
    out({"expected": len(sizes), "received": got, "bad": bad, "stray": stray,
         "ok": got == len(sizes) and not bad})


def cli_udp_burst_send(host, port, bind_port, *spec):
    """Sends a burst (see srv_udp_burst: runs of one size at once with UDP_SEGMENT where the
    kernel takes it) to an udp-collect server, then `END n`, and prints its verdict."""
    sizes = burst_sizes(spec)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(bind_port)))
    s.settimeout(5)
    dst = (host, int(port))
    segmented = send_burst(s, sizes, dst)
    s.sendto(b"END %d" % len(sizes), dst)
    try:
        b, _ = s.recvfrom(65535)
        verdict = json.loads(b)
    except socket.timeout:
        verdict = {"ok": False, "error": "no verdict within 5 s"}
    verdict["segmented"] = segmented
    out(verdict)


def cli_udp_refused(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, int(port)))
    s.settimeout(3)
    t0 = time.monotonic()
    res = None
    for _ in range(3):
        try:
            s.send(b"probe")
            b = s.recv(65535)
            res = "answered: %r" % b[:40]
            break
        except Exception as e:
            res = classify(e)
            if res != "timeout":
                break
    out({"result": res, "elapsed": time.monotonic() - t0})


# ------------------------------------------------------------------------------------------
# Malformed frames (raw AF_PACKET on the guest's tap)
# ------------------------------------------------------------------------------------------


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ip_hdr(src, dst, proto, payload_len, ident=0x4242, frag=0, ihl=5, total=None, bad_sum=False,
           options=b""):
    total = 20 + len(options) + payload_len if total is None else total
    h = struct.pack("!BBHHHBBH4s4s", (4 << 4) | ihl, 0, total, ident, frag, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst)) + options
    c = csum(h)
    if bad_sum:
        c ^= 0x5A5A
    return h[:10] + struct.pack("!H", c) + h[12:]


def pseudo(src, dst, proto, length):
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)


def udp_seg(src, dst, sport, dport, data, bad_sum=False, length=None):
    length = 8 + len(data) if length is None else length
    h = struct.pack("!HHHH", sport, dport, length, 0)
    c = csum(pseudo(src, dst, 17, 8 + len(data)) + h + data) or 0xFFFF
    if bad_sum:
        c ^= 0x5A5A
    return h[:6] + struct.pack("!H", c) + data


def tcp_seg(src, dst, sport, dport, flags=0x02, data=b"", bad_sum=False, doff=5):
    h = struct.pack("!HHIIBBHHH", sport, dport, 0x1000, 0, doff << 4, flags, 64240, 0, 0)
    c = csum(pseudo(src, dst, 6, len(h) + len(data)) + h + data)
    if bad_sum:
        c ^= 0x5A5A
    return h[:16] + struct.pack("!H", c) + h[18:] + data


def icmp_echo(data, bad_sum=False):
    h = struct.pack("!BBHHH", 8, 0, 0, 0x77, 1)
    c = csum(h + data)
    if bad_sum:
        c ^= 0x5A5A
    return h[:2] + struct.pack("!H", c) + h[4:] + data


def frames_for(kind, src, dst, port):
    """The IPv4 packets (without Ethernet header) for one kind of malformation."""
    udp_ok = udp_seg(src, dst, 40001, port, b"malformed-test")
    if kind == "bad_ip_checksum":
        return [ip_hdr(src, dst, 17, len(udp_ok), bad_sum=True) + udp_ok]
    if kind == "total_length_beyond_frame":
        return [ip_hdr(src, dst, 17, len(udp_ok), total=1400) + udp_ok]
    if kind == "total_length_below_header":
        return [ip_hdr(src, dst, 17, len(udp_ok), total=12) + udp_ok]
    if kind == "ihl_below_5":
        return [ip_hdr(src, dst, 17, len(udp_ok), ihl=4) + udp_ok]
    if kind == "ihl_beyond_packet":
        # IHL 15 (60 bytes) while the packet is 20 + 22 bytes long and total length says so.
        h = ip_hdr(src, dst, 17, len(udp_ok), ihl=15, total=20 + len(udp_ok))
        return [h + udp_ok]
    if kind == "truncated_ip_header":
        return [ip_hdr(src, dst, 17, 0)[:12]]
    if kind == "truncated_tcp_header":
        t = tcp_seg(src, dst, 40002, port)[:10]
        return [ip_hdr(src, dst, 6, len(t)) + t]
    if kind == "tcp_data_offset_lying":
        t = tcp_seg(src, dst, 40003, port, doff=15)
        return [ip_hdr(src, dst, 6, len(t)) + t]
    if kind == "udp_length_lying":
        u = udp_seg(src, dst, 40004, port, b"malformed-test", length=200)
        return [ip_hdr(src, dst, 17, len(u)) + u]
    if kind == "udp_length_below_header":
        u = udp_seg(src, dst, 40005, port, b"malformed-test", length=4)
        return [ip_hdr(src, dst, 17, len(u)) + u]
    if kind == "bad_tcp_checksum":
        t = tcp_seg(src, dst, 40006, port, bad_sum=True)
        return [ip_hdr(src, dst, 6, len(t)) + t]
    if kind == "bad_udp_checksum":
        u = udp_seg(src, dst, 40007, port, b"malformed-test", bad_sum=True)
        return [ip_hdr(src, dst, 17, len(u)) + u]
    if kind == "bad_icmp_checksum":
        i = icmp_echo(b"malformed-test-payload", bad_sum=True)
        return [ip_hdr(src, dst, 1, len(i)) + i]
    if kind == "overlapping_fragments":
        data = b"A" * 64
        u = udp_seg(src, dst, 40008, port, data)  # 72 bytes of UDP
        ident = 0x6161
        f1 = u[:48]                               # offset 0, 48 bytes, MF
        f2 = u[24:]                               # offset 24 (3 units): overlaps 24..48
        return [ip_hdr(src, dst, 17, len(f1), ident=ident, frag=0x2000) + f1,
                ip_hdr(src, dst, 17, len(f2), ident=ident, frag=3) + f2]
    raise SystemExit("unknown kind " + kind)


KINDS = ["bad_ip_checksum", "total_length_beyond_frame", "total_length_below_header",
         "ihl_below_5", "ihl_beyond_packet", "truncated_ip_header", "truncated_tcp_header",
         "tcp_data_offset_lying", "udp_length_lying", "udp_length_below_header",
         "bad_tcp_checksum", "bad_udp_checksum", "bad_icmp_checksum", "overlapping_fragments"]


def cli_craft(iface, dst_mac, src, dst, port, kind):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    src_mac = s.getsockname()[4]
    dmac = bytes.fromhex(dst_mac.replace(":", ""))
    eth = dmac + src_mac + b"\x08\x00"
    n = 0
    for pkt in frames_for(kind, src, dst, int(port)):
        # No Ethernet padding: a tap carries short frames as they are, so the IP layer sees
        # exactly the (truncated) packet.
        s.send(eth + pkt)
        n += 1
    out({"kind": kind, "frames": n})



# ------------------------------------------------------------------------------------------
# A guest attached through a QEMU stream socket (tap <-> 4-byte length-prefixed frames)
# ------------------------------------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def tap_bridge(iface, sockpath, mac=None):
    """Creates tap IFACE in this namespace (optionally with MAC), brings it up, connects to the
    unix stream socket SOCKPATH and relays frames both ways, each prefixed on the socket with
    its 4-byte big-endian length (QEMU `-netdev stream`). Prints {"ready": ...} once relaying;
    exits when either side closes (the tap goes away with the process)."""
    import fcntl
    import os
    import select
    import subprocess

    tap = os.open("/dev/net/tun", os.O_RDWR)
    ifr = struct.pack("16sH", iface.encode(), IFF_TAP | IFF_NO_PI)
    fcntl.ioctl(tap, TUNSETIFF, ifr)
    if mac:
        subprocess.run(["ip", "link", "set", "dev", iface, "address", mac], check=True)
    subprocess.run(["ip", "link", "set", "dev", iface, "up"], check=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sockpath)
    out({"ready": True, "iface": iface, "socket": sockpath})
    buf = b""
    to_guest = to_net = 0
    why = None
    while why is None:
        r, _, _ = select.select([tap, s], [], [])
        if tap in r:
            try:
                f = os.read(tap, 65536)
            except OSError as e:
                why = "tap: " + classify(e)
                break
            if not f:
                why = "tap closed"
                break
            try:
                s.sendall(struct.pack("!I", len(f)) + f)
            except OSError as e:
                why = "socket send: " + classify(e)
                break
            to_net += 1
        if s in r:
            try:
                b = s.recv(1 << 20)
            except OSError as e:
                why = "socket recv: " + classify(e)
                break
            if not b:
                why = "socket closed"
                break
            buf += b
            while len(buf) >= 4:
                (n,) = struct.unpack("!I", buf[:4])
                if len(buf) < 4 + n:
                    break
                frame, buf = buf[4:4 + n], buf[4 + n:]
                try:
                    os.write(tap, frame)
                except OSError:
                    pass  # e.g. the interface went down; keep relaying
                to_guest += 1
    out({"exit": why, "frames_to_net": to_net, "frames_to_guest": to_guest})

COMMANDS = {
    "tcp-echo": srv_tcp_echo,
    "tcp-sink": srv_tcp_sink,
    "tcp-source": srv_tcp_source,
    "tcp-halfclose": srv_tcp_halfclose,
    "tcp-serverfirst": srv_tcp_serverfirst,
    "tcp-rst": srv_tcp_rst,
    "tcp-observe": srv_tcp_observe,
    "udp-echo": srv_udp_echo,
    "udp-burst": srv_udp_burst,
    "udp-collect": srv_udp_collect,
    "connect": cli_connect,
    "connect-many": cli_connect_many,
    "connect-reuse": cli_connect_reuse,
    "send": cli_send,
    "recv": cli_recv,
    "halfclose": cli_halfclose,
    "serverfirst": cli_serverfirst,
    "rst": cli_rst,
    "abort": cli_abort,
    "echo-many": cli_echo_many,
    "echo-rounds": cli_echo_rounds,
    "udp-refused": cli_udp_refused,
    "udp-burst-client": cli_udp_burst,
    "udp-burst-send": cli_udp_burst_send,
    "craft": cli_craft,
    "tap-bridge": tap_bridge,
}


def main():
    if len(sys.argv) < 2:
        raise SystemExit("usage: nettool.py CMD ARGS...")
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "udp-echo-client":
        # udp-echo-client HOST PORT BIND_PORT SIZE...
        cli_udp_echo(args[0], args[1], args[3:], bind_port=int(args[2]))
        return
    if cmd == "kinds":
        out(KINDS)
        return
    COMMANDS[cmd](*args)


if __name__ == "__main__":
    main()
