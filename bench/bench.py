#!/usr/bin/env python3
"""bench.py - how fast turnd takes mail in, releases it on ETRN, and how
little memory it needs; side by side with a private Postfix when present.

    python3 bench/bench.py            full run (a few minutes)
    python3 bench/bench.py --quick    smoke run, under a minute
    python3 bench/bench.py --json     machine-readable results on stdout

Standard library only.  It uses Postfix's smtp-source and smtp-sink when
they are installed (and says so), and runs a PRIVATE Postfix instance (its
own config, queue and data directories under a temporary directory, its own
loopback port) when Postfix is installed and we are root.  The system
Postfix configuration and port 25 are never touched.

turnd runs as a child process (sys.executable turnd.py -c CONF) with a
temporary spool on free loopback ports; the load generator runs in other
processes (multiprocessing), so it never shares turnd's GIL.  Every figure
is the median of --reps repetitions.  See bench/README.md.
"""

import argparse
import json
import multiprocessing
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TURND = os.path.join(os.path.dirname(HERE), "turnd.py")
HELD = "held.test"
SENDER = "sender@bench.example"
RCPT = "user@" + HELD
SMTP_SOURCE = shutil.which("smtp-source") or (os.path.exists("/usr/sbin/smtp-source")
                                              and "/usr/sbin/smtp-source") or None
SMTP_SINK = shutil.which("smtp-sink") or (os.path.exists("/usr/sbin/smtp-sink")
                                          and "/usr/sbin/smtp-sink") or None
POSTFIX = shutil.which("postfix") or (os.path.exists("/usr/sbin/postfix")
                                      and "/usr/sbin/postfix") or None


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with status %s before listening" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("nothing listening on port %d after %.0f s" % (port, timeout))


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for " + what)
        time.sleep(0.01)


def proc_status(pid):
    """VmRSS and VmHWM of a process, in KiB."""
    values = {}
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                values[key] = int(rest.split()[0])
    return values


def make_message(size, serial=0):
    """A plain message of about `size` octets, CRLF lines of 78 octets."""
    head = ("From: <%s>\r\nTo: <%s>\r\nSubject: bench %d\r\nMessage-ID: <%d.%d@bench>\r\n\r\n"
            % (SENDER, RCPT, serial, serial, os.getpid())).encode()
    line = b"x" * 76 + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


def median(values):
    return statistics.median(values) if values else None


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


class Client:
    """A minimal blocking SMTP client (greeting, EHLO, commands)."""

    def __init__(self, port, timeout=60):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self):
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    def cmd(self, text):
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Load generator (stdlib): processes x threads, one connection per thread,
# MAIL/RCPT/DATA pipelined in one write (RFC 2920)
# ---------------------------------------------------------------------------

def _sender_thread(port, count, size, ready, go, results, index):
    try:
        client = Client(port)
        code, _ = client.reply()
        assert code == 220, code
        code, text = client.cmd("EHLO bench.example")
        assert code == 250 and b"PIPELINING" in text, text
        message = make_message(size, index) + b".\r\n"
        envelope = ("MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (SENDER, RCPT)).encode()
    except Exception as exc:
        results.append(("error", repr(exc)))
        ready.release()
        return
    ready.release()
    go.wait()
    ok = 0
    try:
        for _ in range(count):
            client.sock.sendall(envelope)
            codes = [client.reply()[0] for _ in range(3)]
            if codes != [250, 250, 354]:
                raise RuntimeError("envelope replies %s" % codes)
            client.sock.sendall(message)
            code, text = client.reply()
            if code != 250:
                raise RuntimeError("DATA reply %r" % text)
            ok += 1
        client.cmd("QUIT")
        results.append(("ok", ok))
    except Exception as exc:
        results.append(("error", "%d sent, then %r" % (ok, exc)))
    finally:
        client.close()


def _sender_process(port, counts, size, ready_q, go_ev, out_q):
    threads, results = [], []
    ready = threading.Semaphore(0)
    go = threading.Event()
    for i, count in enumerate(counts):
        t = threading.Thread(target=_sender_thread,
                             args=(port, count, size, ready, go, results, i))
        t.start()
        threads.append(t)
    for _ in counts:
        ready.acquire()
    ready_q.put(len(counts))
    go_ev.wait()
    go.set()
    for t in threads:
        t.join()
    out_q.put(results)


def stdlib_accept(port, senders, size, total):
    """Send `total` messages over `senders` connections; return msgs/s."""
    per = [total // senders + (1 if i < total % senders else 0) for i in range(senders)]
    nproc = min(senders, max(2, (os.cpu_count() or 2) * 2))
    groups = [per[i::nproc] for i in range(nproc)]
    ctx = multiprocessing.get_context("fork")
    ready_q, out_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_sender_process, args=(port, g, size, ready_q, go, out_q))
             for g in groups if g]
    for p in procs:
        p.start()
    for _ in procs:
        ready_q.get(timeout=120)
    start = time.perf_counter()
    go.set()
    results = [r for _ in procs for r in out_q.get(timeout=600)]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    errors = [r[1] for r in results if r[0] == "error"]
    sent = sum(r[1] for r in results if r[0] == "ok")
    if errors:
        raise RuntimeError("load generator: %d error(s), first: %s" % (len(errors), errors[0]))
    return sent / elapsed


def smtp_source_accept(port, sessions=10, messages=2000, length=2000):
    """smtp-source -s S -m M -l L: one new connection per message."""
    command = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(length),
               "-f", SENDER, "-t", RCPT, "127.0.0.1:%d" % port]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if run.returncode != 0 or "fatal" in run.stderr:
        raise RuntimeError("smtp-source failed: %s" % (run.stderr.strip() or run.returncode))
    return messages / elapsed


# ---------------------------------------------------------------------------
# Sinks: smtp-sink when installed, else a stdlib sink that never fsyncs
# ---------------------------------------------------------------------------

class Sink:
    """Counts messages; records when the first and the N-th one arrived."""

    def __init__(self, target, port=None):
        self.port = port or free_port()
        self.target = target
        self.count = 0
        self.first = self.done_at = None
        self.done = threading.Event()
        self.lock = threading.Lock()

    def _counted(self, count, now):
        with self.lock:
            if count > self.count:
                self.count = count
                if self.first is None:
                    self.first = now
                if count >= self.target and self.done_at is None:
                    self.done_at = now
                    self.done.set()


class SmtpSink(Sink):
    kind = "smtp-sink"

    def __init__(self, target, port=None):
        super().__init__(target, port)
        command = [SMTP_SINK, "-c"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]     # smtp-sink refuses to run as root
        command += ["127.0.0.1:%d" % self.port, "512"]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_port(self.port, proc=self.proc)

    def _read(self):
        # -c prints "sess=N quit=N mesg=N\r" each time a message is accepted.
        pattern, pending = re.compile(rb"mesg=(\d+)"), b""
        while True:
            data = self.proc.stdout.read(65536)
            now = time.perf_counter()
            if not data:
                return
            pending += data
            found = pattern.findall(pending)
            if found:
                self._counted(int(found[-1]), now)
            pending = pending[-64:]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class StdlibSink(Sink):
    kind = "stdlib sink (no fsync)"

    def __init__(self, target, port=None):
        super().__init__(target, port)
        self.server = socket.create_server(("127.0.0.1", self.port), backlog=512)
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        # One reply per command, sent at once: correct under PIPELINING too.
        f = conn.makefile("rb")
        try:
            conn.sendall(b"220 sink ESMTP\r\n")
            while True:
                line = f.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go\r\n")
                    while True:
                        line = f.readline()
                        if not line or line == b".\r\n":
                            break
                    self._counted(0, time.perf_counter())
                    conn.sendall(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def _counted(self, _, now):
        with self.lock:
            self.count += 1
            if self.first is None:
                self.first = now
            if self.count >= self.target and self.done_at is None:
                self.done_at = now
                self.done.set()

    def stop(self):
        self.running = False
        self.server.close()


def make_sink(target, port=None):
    return SmtpSink(target, port) if SMTP_SINK else StdlibSink(target, port)


def etrn_release(port, domain, sink, count, timeout):
    """Send ETRN; return (reply seconds, first-message seconds, last-message seconds)."""
    client = Client(port)
    client.reply()
    client.cmd("EHLO client.bench.example")
    start = time.perf_counter()
    client.sock.sendall(("ETRN %s\r\n" % domain).encode())
    code, text = client.reply()
    replied = time.perf_counter()
    if code not in (250, 251, 253):
        raise RuntimeError("ETRN refused: %r" % text)
    if not sink.done.wait(timeout):
        raise RuntimeError("sink got %d of %d messages in %.0f s" % (sink.count, count, timeout))
    client.cmd("QUIT")
    client.close()
    return replied - start, sink.first - start, sink.done_at - start


# ---------------------------------------------------------------------------
# turnd as a child process
# ---------------------------------------------------------------------------

def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Turnd:
    def __init__(self, workdir, sink_port=None, wrapper=(), processes=1):
        self.dir = tempfile.mkdtemp(prefix="turnd-", dir=workdir)
        self.port = free_port()
        self.spool = os.path.join(self.dir, "spool")
        self.sink_port = sink_port or free_port()
        self.conf = os.path.join(self.dir, "turnd.conf")
        with open(self.conf, "w") as fh:
            fh.write("[turnd]\nlisten = 127.0.0.1:%d\nspool = %s\nhostname = turnd.bench.test\n"
                     "max_connections = 1100\nmax_message_size = 200M\ntimeout = 10m\n"
                     "processes = %d\n"
                     "log = %s\n\n[domain %s]\nroute = client:%d\netrn_from = 127.0.0.0/8\n"
                     % (self.port, self.spool, processes, os.path.join(self.dir, "turnd.log"),
                        HELD, self.sink_port))
        self.proc = subprocess.Popen(list(wrapper) + [sys.executable, TURND, "-c", self.conf],
                                     preexec_fn=_raise_nofile, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "stderr"), "w"))
        wait_port(self.port, proc=self.proc)

    @property
    def pid(self):
        return self.proc.pid

    def queue_dir(self):
        return os.path.join(self.spool, HELD, "new")

    def queued(self):
        try:
            return len(os.listdir(self.queue_dir()))
        except FileNotFoundError:
            return 0

    def fill(self, count, size):
        """Queue `count` messages with turnd's own Spool/Envelope format.

        The files are written straight into new/ without fsync: this is
        benchmark set-up, not mail we answered for."""
        sys.path.insert(0, os.path.dirname(TURND))
        import turnd
        directory = os.path.join(turnd.Spool(self.spool).ensure(HELD), "new")
        for i in range(count):
            qid = turnd.new_queue_id()
            envelope = turnd.Envelope(qid, SENDER, [RCPT], client="127.0.0.1",
                                      helo="bench.example", body="7BIT")
            with open(os.path.join(directory, qid), "wb") as fh:
                fh.write(envelope.to_line())
                fh.write(turnd.received_line("bench.example", "127.0.0.1",
                                             "turnd.bench.test", "ESMTP", qid))
                fh.write(make_message(size, i))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# A private Postfix instance
# ---------------------------------------------------------------------------

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
command_directory = {command_dir}
daemon_directory = {daemon_dir}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relay_domains = {held}
# ETRN (RFC 1985) is Postfix's "fast flush" service: the ids of deferred
# mail for these domains are logged per domain, and ETRN redelivers them.
fast_flush_domains = $relay_domains
# Everything goes to the sink's port.  While no sink listens, delivery fails
# with "connection refused" and the mail waits in the deferred queue until
# ETRN: the held domain.
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
local_recipient_maps =
smtp_host_lookup = native
disable_dns_lookups = yes
biff = no
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
"""


class PrivatePostfix:
    """Postfix with its own config_directory, queue_directory and
    data_directory under a temporary directory, on a free loopback port."""

    def __init__(self, workdir):
        self.dir = tempfile.mkdtemp(prefix="postfix-", dir=workdir)
        os.chmod(self.dir, 0o755)
        self.port, self.sink_port = free_port(), free_port()
        self.conf = os.path.join(self.dir, "conf")
        for sub in ("conf", "queue", "data"):
            os.makedirs(os.path.join(self.dir, sub))
        owner = pwd.getpwnam("postfix")
        os.chown(os.path.join(self.dir, "data"), owner.pw_uid, owner.pw_gid)
        daemon_dir = next((d for d in ("/usr/lib/postfix/sbin", "/usr/libexec/postfix",
                                       "/usr/lib/postfix") if os.path.exists(
                                           os.path.join(d, "master"))), "/usr/lib/postfix/sbin")
        with open(os.path.join(self.conf, "main.cf"), "w") as fh:
            fh.write(MAIN_CF.format(dir=self.dir, held=HELD, sink_port=self.sink_port,
                                    command_dir=os.path.dirname(POSTFIX), daemon_dir=daemon_dir))
        with open(os.path.join(self.conf, "master.cf"), "w") as fh:
            fh.write(MASTER_CF.format(port=self.port))
        run = self.postfix("start")
        try:
            wait_port(self.port, timeout=20)
        except RuntimeError:
            raise RuntimeError("postfix -c %s start: %s; maillog: %s" % (
                self.conf, (run.stdout + run.stderr).strip(), self.maillog_tail()))

    def postfix(self, *args):
        return subprocess.run([POSTFIX, "-c", self.conf] + list(args), capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    def maillog_tail(self):
        try:
            with open(os.path.join(self.dir, "maillog")) as fh:
                return " | ".join(fh.read().splitlines()[-5:])
        except OSError:
            return "(none)"

    def count(self, *queues):
        total = 0
        for name in queues:
            for _, _, files in os.walk(os.path.join(self.dir, "queue", name)):
                total += len(files)
        return total

    def wait_deferred(self, count, timeout):
        def settled():
            return (self.count("deferred") >= count
                    and self.count("incoming", "active", "maildrop") == 0)
        wait_for(settled, timeout, "Postfix to defer %d messages" % count)

    def clear(self):
        subprocess.run([os.path.join(os.path.dirname(POSTFIX), "postsuper"), "-c", self.conf,
                        "-d", "ALL"], capture_output=True, timeout=120)
        wait_for(lambda: self.count("incoming", "active", "deferred") == 0, 60,
                 "Postfix queue to empty")

    def stop(self):
        self.postfix("stop")
        pidfile = os.path.join(self.dir, "queue", "pid", "master.pid")

        def gone():
            try:
                pid = int(open(pidfile).read().split()[0])
                os.kill(pid, 0)
                with open("/proc/%d/stat" % pid) as fh:
                    return fh.read().split(")")[-1].split()[0] == "Z"
            except (OSError, ValueError, IndexError):
                return True
        with_timeout = time.monotonic() + 20
        while not gone() and time.monotonic() < with_timeout:
            time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)


def postfix_unavailable():
    if not POSTFIX:
        return "postfix is not installed"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user"
    if not SMTP_SOURCE:
        return "smtp-source is not installed (needed for the same workload)"
    return None


# ---------------------------------------------------------------------------
# The workloads
# ---------------------------------------------------------------------------

def cpu_seconds(pid):
    """user + system CPU time so far of a process and its live children
    (turnd's worker processes with processes > 1), in seconds."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def summary(values, digits=1):
    return {"median": round(median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def run(args, log):
    results = {"machine": machine(args.tmp), "processes": args.processes, "tools": {
        "smtp-source": SMTP_SOURCE, "smtp-sink": SMTP_SINK, "postfix": POSTFIX},
        "reps": args.reps, "load_before": loadavg(), "turnd": {}, "postfix": {},
        "notes": []}
    results["sink"] = SmtpSink.kind if SMTP_SINK else StdlibSink.kind
    workloads = set(args.workloads.split(","))
    pf = None
    if "postfix" in workloads and workloads & {"accept", "release"}:
        why = postfix_unavailable()
        if not why:
            log("postfix: starting a private instance ")
            try:
                pf = PrivatePostfix(args.tmp)
                log("on 127.0.0.1:%d (config %s)\n" % (pf.port, pf.conf))
            except Exception as exc:
                why = "private Postfix failed: %s" % exc
        if why:
            results["postfix_skipped"] = why
            log("postfix not measured: %s\n" % why)
    try:
        if "accept" in workloads:
            accept_phase(args, results, pf, log)
        if "release" in workloads:
            release_phase(args, results, pf, log)
    finally:
        if pf is not None:
            pf.stop()
    if "memory" in workloads:
        log("turnd memory: one %d MB message" % args.big_mb)
        results["turnd"]["memory_big_message"] = big_message(args.tmp, args.big_mb)
        log(" +%.1f MB\n" % results["turnd"]["memory_big_message"]["growth_mb"])
        log("turnd memory: %d idle connections" % args.idle)
        results["turnd"]["memory_idle"] = idle_connections(args.tmp, args.idle)
        log(" %(served)d served, +%(growth_mb).1f MB\n" % results["turnd"]["memory_idle"])
    results["load_after"] = loadavg()
    results["ratios"] = ratios(results)
    return results


def accept_phase(args, results, pf, log):
    """Acceptance.  Files are never deleted between repetitions: on ext4,
    creating files just after deleting many is several times slower
    (ext4's recently_deleted() inode scan), which would punish whichever
    server ran after a clean-up."""
    t, p = results["turnd"], results["postfix"]
    server = Turnd(args.tmp, processes=args.processes)
    try:
        stdlib_accept(server.port, 2, 2000, 100)             # warm-up
        for senders in args.senders:
            for size in args.sizes:
                total = max(senders, args.messages_small if size <= 10000
                            else args.messages_large)
                log("turnd accept: %d sender(s) x %d B, %d messages, pipelined " % (
                    senders, size, total))
                rates, cpus = [], []
                for _ in range(args.reps):
                    cpu = cpu_seconds(server.pid)
                    rates.append(stdlib_accept(server.port, senders, size, total))
                    cpus.append((cpu_seconds(server.pid) - cpu) / total * 1000)
                    log(".")
                key = "accept_%dx%dB" % (senders, size)
                t[key] = dict(summary(rates, 0), cpu_ms_per_msg=summary(cpus, 2))
                log(" %.0f msg/s\n" % t[key]["median"])
        if not SMTP_SOURCE:
            results["notes"].append("smtp-source is not installed: no smtp-source workload")
            return
        n = args.source_messages
        log("accept: smtp-source -s 10 -m %d -l 2000, turnd%s, alternating " % (
            n, " and postfix" if pf else ""))
        smtp_source_accept(server.port, 10, 200)               # warm-up
        expected = 0
        if pf:
            smtp_source_accept(pf.port, 10, 200)
            expected += 200
            pf.wait_deferred(expected, 120)
        rates, cpus, pf_rates = [], [], []
        for _ in range(args.reps):
            cpu = cpu_seconds(server.pid)
            rates.append(smtp_source_accept(server.port, 10, n))
            cpus.append((cpu_seconds(server.pid) - cpu) / n * 1000)
            if pf:
                pf_rates.append(smtp_source_accept(pf.port, 10, n))
                expected += n
                pf.wait_deferred(expected, 120)
            log(".")
        t["smtp_source_10x2000B"] = dict(summary(rates, 0), cpu_ms_per_msg=summary(cpus, 2))
        log(" turnd %.0f msg/s" % t["smtp_source_10x2000B"]["median"])
        if pf:
            p["smtp_source_10x2000B"] = summary(pf_rates, 0)
            log(", postfix %.0f msg/s" % p["smtp_source_10x2000B"]["median"])
        log("\n")
    finally:
        server.stop()


def release_once(server, count, rows, cpus):
    server.fill(count, 2000)
    os.sync()       # queued mail is on disk, as after real fsynced acceptance
    sink = make_sink(count, server.sink_port)
    try:
        cpu = cpu_seconds(server.pid)
        rows.append(etrn_release(server.port, HELD, sink, count, timeout=60 + count / 50))
        cpus.append((cpu_seconds(server.pid) - cpu) / count * 1000)
        # The sink counts a message before turnd has read its 250: keep the
        # sink up until turnd has removed the last file.
        wait_for(lambda: server.queued() == 0, 60, "turnd's queue to empty")
    finally:
        sink.stop()


def release_postfix_once(pf, count, rows):
    smtp_source_accept(pf.port, 10, count)          # no sink yet: all deferred
    pf.wait_deferred(count, 120)
    os.sync()
    sink = make_sink(count, pf.sink_port)
    try:
        rows.append(etrn_release(pf.port, HELD, sink, count, timeout=60 + count / 50))
        wait_for(lambda: pf.count("incoming", "active", "deferred") == 0, 60,
                 "Postfix's queue to empty")
    finally:
        sink.stop()


def release_phase(args, results, pf, log):
    """Release: turnd's queue is filled through turnd's own Spool format
    (turnd.Envelope lines written into new/); Postfix's through SMTP with
    smtp-source while no sink listens, so the mail is deferred."""
    t, p = results["turnd"], results["postfix"]
    if pf:
        pf.clear()
    for count in args.release:
        with_pf = pf is not None and count == args.postfix_release
        log("release %d via ETRN to %s: turnd%s " % (
            count, results["sink"], " and postfix, alternating" if with_pf else ""))
        server = Turnd(args.tmp)
        rows, cpus, pf_rows = [], [], []
        try:
            for _ in range(args.reps):
                release_once(server, count, rows, cpus)
                if with_pf:
                    release_postfix_once(pf, count, pf_rows)
                log(".")
        finally:
            server.stop()
        key = "release_%d" % count
        t[key] = release_summary(rows, count)
        t[key]["cpu_ms_per_msg"] = summary(cpus, 3)
        log(" turnd %.0f msg/s" % t[key]["msgs_per_s"]["median"])
        if with_pf:
            p[key] = release_summary(pf_rows, count)
            log(", postfix %.0f msg/s" % p[key]["msgs_per_s"]["median"])
        log("\n")
    if pf and args.postfix_release not in args.release:
        key = "release_%d" % args.postfix_release
        log("release %d via ETRN: postfix " % args.postfix_release)
        rows = []
        for _ in range(args.reps):
            release_postfix_once(pf, args.postfix_release, rows)
            log(".")
        p[key] = release_summary(rows, args.postfix_release)
        log(" %.0f msg/s\n" % p[key]["msgs_per_s"]["median"])


def release_summary(rows, count):
    return {"messages": count,
            "etrn_reply_ms": summary([r[0] * 1000 for r in rows], 2),
            "first_message_ms": summary([r[1] * 1000 for r in rows], 1),
            "total_s": summary([r[2] for r in rows], 3),
            "msgs_per_s": summary([count / r[2] for r in rows], 0),
            "us_per_msg": summary([r[2] / count * 1e6 for r in rows], 0)}


def big_message(workdir, megabytes):
    server = Turnd(workdir)
    try:
        client = Client(server.port)
        client.reply()
        client.cmd("EHLO bench.example")
        # Warm up: one small message, so code paths are loaded before the baseline.
        for cmd in ("MAIL FROM:<%s>" % SENDER, "RCPT TO:<%s>" % RCPT, "DATA"):
            client.cmd(cmd)
        client.sock.sendall(make_message(2000) + b".\r\n")
        client.reply()
        before = proc_status(server.pid)
        for cmd in ("MAIL FROM:<%s>" % SENDER, "RCPT TO:<%s>" % RCPT, "DATA"):
            client.cmd(cmd)
        block = b"y" * 998 + b"\r\n"
        chunk = block * 1000                                 # 1 MB
        start = time.perf_counter()
        for _ in range(megabytes):
            client.sock.sendall(chunk)
        client.sock.sendall(b".\r\n")
        code, text = client.reply()
        elapsed = time.perf_counter() - start
        after = proc_status(server.pid)
        client.cmd("QUIT")
        client.close()
        if code != 250:
            raise RuntimeError("big message refused: %r" % text)
        return {"size_mb": megabytes, "rss_before_mb": round(before["VmRSS"] / 1024, 1),
                "hwm_after_mb": round(after["VmHWM"] / 1024, 1),
                "growth_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1),
                "seconds": round(elapsed, 2), "mb_per_s": round(megabytes / elapsed, 1)}
    finally:
        server.stop()


def idle_connections(workdir, count):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
    server = Turnd(workdir)
    clients, failures = [], 0
    try:
        before = proc_status(server.pid)
        for _ in range(count):
            try:
                clients.append(Client(server.port, timeout=30))
            except OSError:
                failures += 1
        greeted = 0
        for client in clients:
            try:
                greeted += client.reply()[0] == 220
            except OSError:
                failures += 1
        during = proc_status(server.pid)
        # While all of them are open, a new session still works end to end.
        probe = Client(server.port)
        probe_ok = probe.reply()[0] == 220 and probe.cmd("EHLO probe")[0] == 250 and \
            probe.cmd("NOOP")[0] == 250
        probe.close()
        served = 0
        for client in clients:
            try:
                served += client.cmd("QUIT")[0] == 221
            except OSError:
                failures += 1
        return {"connections": count, "greeted": greeted, "served": served,
                "probe_ok": probe_ok, "failures": failures,
                "threads": during.get("Threads"),
                "rss_before_mb": round(before["VmRSS"] / 1024, 1),
                "rss_during_mb": round(during["VmRSS"] / 1024, 1),
                "growth_mb": round((during["VmHWM"] - before["VmRSS"]) / 1024, 1),
                "kb_per_connection": round((during["VmRSS"] - before["VmRSS"]) / count, 1)}
    finally:
        for client in clients:
            client.close()
        server.stop()


def ratios(results):
    t, p = results["turnd"], results["postfix"]
    out = {}
    if "smtp_source_10x2000B" in t and "smtp_source_10x2000B" in p:
        out["accept_smtp_source_10x2000B"] = round(
            t["smtp_source_10x2000B"]["median"] / p["smtp_source_10x2000B"]["median"], 2)
    for key in p:
        if key.startswith("release_") and key in t:
            out[key] = round(t[key]["msgs_per_s"]["median"] / p[key]["msgs_per_s"]["median"], 2)
    return out


# ---------------------------------------------------------------------------
# Machine description and output
# ---------------------------------------------------------------------------

def machine(path):
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    disk = "unknown"
    with open("/proc/self/mounts") as fh:
        mounts = [line.split() for line in fh]
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)
    if best:
        disk = "%s on %s (%s)" % (best[0], best[1], best[2])
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "disk": disk,
            "postfix": postfix_version()}


def postfix_version():
    if not POSTFIX:
        return None
    postconf = os.path.join(os.path.dirname(POSTFIX), "postconf")
    try:
        run = subprocess.run([postconf, "-d", "-h", "mail_version"], capture_output=True,
                             text=True, timeout=10)
        return run.stdout.strip() or None
    except OSError:
        return None


def table(results):
    t, p, r = results["turnd"], results["postfix"], results["ratios"]
    m = results["machine"]
    lines = ["turnd benchmark: %d cores, %s, Linux %s, Python %s, %s" % (
        m["nproc"], m["cpu"], m["kernel"], m["python"], m["disk"]),
        "median of %d run(s); load average before %s, after %s; sink: %s" % (
        results["reps"], results["load_before"], results["load_after"], results["sink"]),
        "turnd accepts with processes = %s; release and memory runs use 1" % (
        results.get("processes", 1)), ""]
    row = "%-44s %22s %10s %7s"
    lines.append(row % ("workload", "turnd", "postfix", "ratio"))
    lines.append("-" * 86)

    def cell(d, key, sub=None, fmt="%.0f"):
        v = d.get(key)
        if v is None:
            return "-"
        v = v[sub] if sub else v
        return fmt % (v["median"] if isinstance(v, dict) else v)
    accepts = [(int(k.split("_")[1].split("x")[0]), int(k.split("x")[1][:-1]), k)
               for k in t if k.startswith("accept_")]
    for senders, size, key in sorted(accepts, key=lambda a: (a[1], a[0])):
        lines.append(row % ("accept msg/s, %d sender%s, %d KB, pipelined" % (
            senders, "s" if senders > 1 else "", size // 1000),
            "%s (%s ms CPU)" % (cell(t, key), cell(t, key, "cpu_ms_per_msg", "%.2f")), "-", ""))
    if "smtp_source_10x2000B" in t or "smtp_source_10x2000B" in p:
        key = "smtp_source_10x2000B"
        lines.append(row % ("accept msg/s, smtp-source -s 10 -l 2000",
                            "%s (%s ms CPU)" % (cell(t, key), cell(t, key, "cpu_ms_per_msg",
                                                                   "%.2f")),
                            cell(p, key), r.get("accept_smtp_source_10x2000B", "")))
    for key in sorted((k for k in set(t) | set(p) if k.startswith("release_")),
                      key=lambda k: int(k.split("_")[1])):
        n = key.split("_")[1]
        lines.append(row % ("release %s: ETRN -> last at sink, s" % n,
                            cell(t, key, "total_s", "%.2f"), cell(p, key, "total_s", "%.2f"), ""))
        lines.append(row % ("release %s: msg/s" % n, cell(t, key, "msgs_per_s"),
                            cell(p, key, "msgs_per_s"), r.get(key, "")))
        lines.append(row % ("release %s: us per message" % n, cell(t, key, "us_per_msg"),
                            cell(p, key, "us_per_msg"), ""))
        if t.get(key):
            lines.append(row % ("release %s: turnd CPU ms per message" % n,
                                cell(t, key, "cpu_ms_per_msg", "%.3f"), "-", ""))
        lines.append(row % ("release %s: ETRN reply, ms" % n, cell(t, key, "etrn_reply_ms",
                                                                  "%.2f"),
                            cell(p, key, "etrn_reply_ms", "%.2f"), ""))
        lines.append(row % ("release %s: ETRN -> first at sink, ms" % n,
                            cell(t, key, "first_message_ms", "%.1f"),
                            cell(p, key, "first_message_ms", "%.1f"), ""))
    big = t.get("memory_big_message")
    if big:
        lines.append(row % ("RSS growth, one %d MB message, MB" % big["size_mb"],
                            "%.1f" % big["growth_mb"], "-", ""))
    idle = t.get("memory_idle")
    if idle:
        lines.append(row % ("%d idle connections: served / RSS growth MB" % idle["connections"],
                            "%d / %.1f" % (idle["served"], idle["growth_mb"]), "-", ""))
    if results.get("postfix_skipped"):
        lines.append("")
        lines.append("Postfix not measured: " + results["postfix_skipped"])
    lines.append("")
    lines.append("ratio = turnd rate / postfix rate (above 1: turnd faster).  CPU = turnd's "
                 "user+system CPU per message.")
    for note in results["notes"]:
        lines.append("note: " + note)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--reps", type=int, help="repetitions per figure (median reported)")
    parser.add_argument("--workloads", default="accept,release,memory,postfix",
                        help="comma-separated: accept,release,memory,postfix")
    parser.add_argument("--senders", help="concurrent senders, e.g. 1,10,50")
    parser.add_argument("--sizes", help="message sizes in bytes, e.g. 2000,100000")
    parser.add_argument("--release", help="queue sizes to release, e.g. 2000,20000")
    parser.add_argument("--no-postfix", action="store_true", help="turnd only")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="turnd's processes for the acceptance runs (default: the "
                             "number of cores, as its README recommends)")
    parser.add_argument("--tmp", default=None,
                        help="where the temporary spools live (default /var/tmp)")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON results to FILE")
    parser.add_argument("--table-from", metavar="FILE", help="print the table of saved results")
    args = parser.parse_args()
    if args.table_from:
        with open(args.table_from) as fh:
            print(table(json.load(fh)))
        return
    quick = args.quick
    args.reps = args.reps or (1 if quick else 3)
    args.senders = [int(x) for x in (args.senders or ("1,10" if quick else "1,10,50")).split(",")]
    args.sizes = [int(x) for x in (args.sizes or ("2000,100000")).split(",")]
    args.release = [int(x) for x in (args.release or ("2000" if quick else "2000,20000"))
                    .split(",")]
    args.messages_small = 300 if quick else 2000
    args.messages_large = 60 if quick else 400
    args.source_messages = 500 if quick else 2000
    args.postfix_release = 1000 if quick else 2000
    args.big_mb = 100
    args.idle = 1000
    if quick:
        args.release = [min(n, 1000) for n in args.release]
    if args.no_postfix:
        args.workloads = ",".join(w for w in args.workloads.split(",") if w != "postfix")
    # /var/tmp, not /tmp: /tmp is often a tmpfs, where fsync costs nothing.
    args.tmp = args.tmp or ("/var/tmp" if os.access("/var/tmp", os.W_OK) else
                            tempfile.gettempdir())

    def log(text):
        sys.stderr.write(text)
        sys.stderr.flush()
    log("tools: smtp-source %s, smtp-sink %s, postfix %s\n" % (
        SMTP_SOURCE or "absent (stdlib load generator only)",
        SMTP_SINK or "absent (stdlib sink, no fsync)", POSTFIX or "absent"))
    results = run(args, log)
    if args.save:
        with open(args.save, "w") as fh:
            json.dump(results, fh, indent=2)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
