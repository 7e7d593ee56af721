"""Tests for turnd: a real server on a real socket, real clients.

Run with:  python3 -m pytest -q test_turnd.py

Fixtures start turnd in this process on port 0 (or as a child process
where signals, inetd or crashes are the subject); a small scripted SMTP
peer plays the part-time host.  Waiting is always polling with a deadline.
Tests that need an external program (fetchmail, xinetd, openssl) are
skipped with a reason when it is absent; .ci/run installs them.
"""

import base64
import contextlib
import email
import email.policy
import hashlib
import hmac
import json
import logging
import os
import shutil
import signal
import smtplib
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

import turnd

HERE = os.path.dirname(os.path.abspath(__file__))
TURND = os.path.join(HERE, "turnd.py")
DEADLINE = 20.0        # seconds: the longest any poll waits before failing


# ---------------------------------------------------------------------------
# Helpers: polling, configuration, the server under test
# ---------------------------------------------------------------------------

def wait_for(predicate, timeout=DEADLINE, what="condition"):
    """Poll `predicate` until it returns a true value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.01)


def write_config(directory, turnd_section=None, domains=None, users=None):
    """Write turnd.conf (and a users file) under `directory`; return its path.

    turnd_section: {key: value} for [turnd]; domains: {name: {key: value}};
    users: {name: secret} (written mode 0600 and named in [turnd] users).
    """
    section = {"listen": "127.0.0.1:0", "spool": os.path.join(directory, "spool"),
               "hostname": "mx.test.example", "log": "stderr"}
    section.update(turnd_section or {})
    if users is not None:
        path = os.path.join(directory, "users")
        with open(path, "w") as fh:
            fh.write("# test accounts\n")
            for name, secret in users.items():
                fh.write("%s:%s\n" % (name, secret))
        os.chmod(path, 0o600)
        section.setdefault("users", path)
    lines = ["[turnd]"] + ["%s = %s" % item for item in section.items()]
    for name, keys in (domains or {}).items():
        lines.append("")
        lines.append("[domain %s]" % name)
        lines += ["%s = %s" % item for item in keys.items()]
    path = os.path.join(directory, "turnd.conf")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


class LogCapture(logging.Handler):
    """Collects turnd's log records so tests can look for lines and tracebacks."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    @property
    def text(self):
        lines = []
        for record in list(self.records):
            lines.append(record.getMessage())
            if record.exc_info:
                lines.append("Traceback: %r" % (record.exc_info[1],))
        return "\n".join(lines)


class Server:
    """turnd running in this process, on port 0, with its own spool.

    server.port / server.odmr_port, server.spool (path), server.app (Turnd).
    """

    def __init__(self, directory, turnd_section=None, domains=None, users=None,
                 odmr=False, threads=2):
        section = dict(turnd_section or {})
        if odmr:
            section.setdefault("odmr_listen", "127.0.0.1:0")
        self.directory = directory
        self.config_path = write_config(directory, section, domains, users)
        self.config = turnd.load_config(self.config_path)
        self.spool = self.config.spool
        self.app = turnd.Turnd(self.config)
        self.app.bind()
        self.app.deliverer.start(threads)
        self.threads = []
        for server in self.app.servers:
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.port = self.app.servers[0].server_address[1]
        odmr_servers = [s for s in self.app.servers if s.odmr]
        self.odmr_port = odmr_servers[0].server_address[1] if odmr_servers else None

    def stop(self):
        if not self.app.stopping.is_set():
            self.app.shutdown()

    def smtp(self, **kwargs):
        """An smtplib client connected to the main listener."""
        return smtplib.SMTP("127.0.0.1", self.port, timeout=DEADLINE, **kwargs)

    def raw(self, port=None):
        return RawClient(self.port if port is None else port)

    def queued(self, domain):
        """Names of the messages queued for `domain`."""
        return sorted(os.listdir(os.path.join(self.spool, domain, "new"))) \
            if os.path.isdir(os.path.join(self.spool, domain, "new")) else []

    def read_queued(self, domain, name=None):
        """(envelope dict, message bytes) of a queued message (the only one by default)."""
        names = self.queued(domain)
        name = name or (names[0] if len(names) == 1 else None)
        assert name, "expected exactly one message in %s, found %r" % (domain, names)
        with open(os.path.join(self.spool, domain, "new", name), "rb") as fh:
            envelope = json.loads(fh.readline())
            return envelope, fh.read()

    def tmp_files(self):
        found = []
        for root, dirs, files in os.walk(self.spool):
            if os.path.basename(root) == "tmp":
                found += files
        return found

    def wait_idle(self):
        """Wait until no delivery is waiting or running."""
        deliverer = self.app.deliverer
        wait_for(lambda: not deliverer.waiting and not deliverer.running
                 and deliverer.work.empty(), what="deliveries to finish")


@pytest.fixture
def log_capture():
    capture = LogCapture()
    logger = logging.getLogger("turnd")
    logger.addHandler(capture)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(old_level)


@pytest.fixture
def make_server(tmp_path, log_capture):
    """Factory: make_server(turnd_section=..., domains=..., users=..., odmr=...)."""
    servers = []

    def factory(**kwargs):
        directory = tempfile.mkdtemp(dir=str(tmp_path))
        server = Server(directory, **kwargs)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()
    assert "Traceback" not in log_capture.text, log_capture.text


# ---------------------------------------------------------------------------
# A raw SMTP client, for what smtplib will not send
# ---------------------------------------------------------------------------

class RawClient:
    """A socket that speaks SMTP by hand: send bytes, read whole replies."""

    def __init__(self, port, host="127.0.0.1", sock=None):
        self.sock = sock or socket.create_connection((host, port), timeout=DEADLINE)
        self.sock.settimeout(DEADLINE)
        self.buffer = b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("ascii")
        self.sock.sendall(data)

    def line(self):
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed; buffer %r" % self.buffer)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("ascii", "replace")

    def reply(self):
        """One whole reply: (code, [text lines])."""
        lines = []
        while True:
            line = self.line()
            assert len(line) >= 3 and line[:3].isdigit(), "malformed reply %r" % line
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def code(self):
        return self.reply()[0]

    def cmd(self, command):
        """Send one command line and return (code, text of the last line)."""
        self.send(command + "\r\n")
        code, lines = self.reply()
        return code, lines[-1]

    def closed(self, timeout=DEADLINE):
        """True once the server has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buffer += data
        except socket.timeout:
            return False
        except OSError:
            return True

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------------------
# A scripted SMTP peer: the part-time host's MTA
# ---------------------------------------------------------------------------

class PeerBehaviour:
    """How the scripted peer answers.  Override fields per test.

    rcpt_replies: {address: "550 5.1.1 no such user"} for chosen recipients;
    mail_reply / data_reply: the reply to MAIL / to the end of data;
    drop_in_data: close the connection after reading this many data lines;
    greeting: the 220 (may be multi-line, lines separated by "\\n");
    extensions: EHLO keywords.
    """

    def __init__(self, **fields):
        self.greeting = "220 parttime.test ESMTP scripted peer"
        self.extensions = ["PIPELINING", "8BITMIME", "SIZE 0"]
        self.mail_reply = "250 2.1.0 ok"
        self.rcpt_replies = {}
        self.data_reply = "250 2.0.0 accepted"
        self.drop_in_data = None
        self.__dict__.update(fields)


class PeerSession:
    """Play the receiving side of SMTP on a connected socket."""

    def __init__(self, sock, behaviour, received, lock):
        self.sock, self.behaviour, self.received, self.lock = sock, behaviour, received, lock
        self.file = sock.makefile("rb")
        self.commands = []

    def send(self, text):
        self.sock.sendall(text.replace("\n", "\r\n").encode("ascii") + b"\r\n")

    def run(self):
        behaviour = self.behaviour
        greeting = behaviour.greeting.split("\n")
        self.send("\n".join(["220-" + line[4:] for line in greeting[:-1]] + [greeting[-1]]))
        sender, rcpts = None, []
        while True:
            line = self.file.readline()
            if not line:
                return
            command = line.decode("ascii", "replace").rstrip("\r\n")
            self.commands.append(command)
            verb = command[:4].upper()
            if verb == "EHLO":
                lines = ["parttime.test"] + behaviour.extensions
                self.send("\n".join("250-" + l for l in lines[:-1]) + "\n250 " + lines[-1])
            elif verb == "HELO":
                self.send("250 parttime.test")
            elif verb == "MAIL":
                sender, rcpts = command[10:].split(">")[0].lstrip("<"), []
                self.send(behaviour.mail_reply)
            elif verb == "RCPT":
                address = command[8:].split(">")[0].lstrip("<")
                answer = behaviour.rcpt_replies.get(address, "250 2.1.5 ok")
                if answer.startswith("2"):
                    rcpts.append(address)
                self.send(answer)
            elif verb == "DATA":
                if not rcpts:
                    self.send("554 5.5.1 no valid recipients")
                    continue
                self.send("354 go ahead")
                data = self.read_data()
                if data is None:
                    return
                if behaviour.data_reply.startswith("2"):
                    with self.lock:
                        self.received.append((sender, list(rcpts), data))
                self.send(behaviour.data_reply)
            elif verb == "RSET":
                sender, rcpts = None, []
                self.send("250 2.0.0 ok")
            elif verb == "QUIT":
                self.send("221 2.0.0 bye")
                return
            elif verb == "NOOP":
                self.send("250 2.0.0 ok")
            else:
                self.send("500 5.5.2 what?")

    def read_data(self):
        """Read to <CRLF>.<CRLF>; undo dot-stuffing; None if dropped."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return None
            if line == b".\r\n":
                return b"".join(lines)
            if line.startswith(b"."):
                line = line[1:]
            lines.append(line)
            if self.behaviour.drop_in_data is not None and len(lines) >= self.behaviour.drop_in_data:
                self.sock.close()
                return None


class ScriptedPeer:
    """A listening scripted SMTP peer on 127.0.0.1, port 0.

    peer.port, peer.received [(sender, rcpts, data bytes)], peer.sessions,
    peer.behaviour (change it between deliveries), peer.connections.
    """

    def __init__(self, behaviour=None):
        self.behaviour = behaviour or PeerBehaviour()
        self.received, self.sessions, self.lock = [], [], threading.Lock()
        self.connections = 0
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                with peer.lock:
                    peer.connections += 1
                session = PeerSession(self.request, peer.behaviour, peer.received, peer.lock)
                peer.sessions.append(session)
                with contextlib.suppress(OSError):
                    session.run()

        class Listener(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Listener(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def wait_messages(self, count, timeout=DEADLINE):
        wait_for(lambda: len(self.received) >= count, timeout,
                 "%d message(s) at the peer (have %d)" % (count, len(self.received)))
        return self.received

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peer():
    scripted = ScriptedPeer()
    yield scripted
    scripted.close()


def free_port():
    """A port nothing listens on now (for 'receiver absent' and xinetd)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send_mail(server, rcpts, body=b"Subject: test\r\n\r\nhello\r\n", sender="alice@sender.example"):
    """Send one message with smtplib; return the queue id from the 250 reply."""
    with server.smtp() as client:
        client.ehlo("client.test")
        client.mail(sender)
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        code, text = client.data(body)
        assert code == 250, (code, text)
        return text.decode().rsplit(" ", 1)[-1]


def message_body(data):
    """The message as stored, without our Received line (the first 3 lines)."""
    assert data.startswith(b"Received: from ")
    return data.split(b"\r\n", 3)[3]


# ---------------------------------------------------------------------------
# Smoke: the harness itself
# ---------------------------------------------------------------------------

def test_message_for_held_domain_is_spooled_and_released_by_etrn(make_server, peer):
    server = make_server(domains={"parttime.example": {
        "route": "127.0.0.1:%d" % peer.port}})
    send_mail(server, ["bob@parttime.example"], b"Subject: hi\r\n\r\n.starts with dot\r\n")
    envelope, data = server.read_queued("parttime.example")
    assert envelope["rcpts"] == ["bob@parttime.example"]
    assert message_body(data) == b"Subject: hi\r\n\r\n.starts with dot\r\n"
    raw = server.raw()
    assert raw.code() == 220
    assert raw.cmd("ETRN parttime.example")[0] == 253
    received = peer.wait_messages(1)
    assert received[0][2] == data
    wait_for(lambda: not server.queued("parttime.example"), what="queue empty")
