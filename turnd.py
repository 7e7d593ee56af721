#!/usr/bin/env python3
"""turnd - hold mail for part-time hosts and release it on ETRN, TURN or ATRN.

SYNOPSIS

    python3 turnd.py [-c FILE] [--listen HOST:PORT] [--spool DIR]
                     [--domain NAME[=ROUTE]]... [-v]
    python3 turnd.py --inetd [--odmr] [-c FILE]
    python3 turnd.py --queue [--json] [-c FILE]
    python3 turnd.py --flush DOMAIN [-c FILE]
    python3 turnd.py --run-queue [-c FILE]
    python3 turnd.py --check [-c FILE]
    python3 turnd.py --help | --version

WHAT IT IS FOR

A *part-time host* (a home server, a laptop, a machine on a dynamic or
dial-up address) cannot take mail at any moment, so the Internet delivers
its mail to a *full-time host* that holds it.  turnd is that full-time host.
It accepts mail only for the domains it is configured to hold, keeps it in
a spool directory per domain, and releases it when the part-time host asks:

ETRN (RFC 1985)
    The part-time host connects and says "ETRN example.org".  turnd answers
    at once and a background thread delivers the domain's queue over a
    *new* SMTP connection, to the route configured for the domain.

TURN (RFC 821)
    The part-time host connects, says TURN, and the two ends swap roles on
    the same connection: turnd becomes the client and delivers.  Plain TURN
    let anyone steal anyone's mail, so turnd accepts it only after AUTH, only
    for domains with "turn = yes", and only for the domains the account owns.

ATRN (RFC 2645, On-Demand Mail Relay)
    TURN done properly: its own listener (port 366), CRAM-MD5 authentication,
    and a list of domains, all of which the account must own.  This is what
    fetchmail's "proto odmr" speaks.

AutoTURN
    With "autoturn = yes", any SMTP connection from an address in the
    domain's etrn_from list is itself the kick: a part-time host whose MTA
    only ever sends mail gets its own mail back without knowing ETRN.

COMMAND LINE

    -c FILE, --config FILE   read the configuration (INI) from FILE
    --listen HOST:PORT       listen there instead (repeatable)
    --spool DIR              the spool directory
    --domain NAME[=ROUTE]    hold mail for NAME (repeatable); ROUTE is
                             client[:PORT], HOST[:PORT] or hold
    -v, --verbose            log every SMTP command and reply
    --inetd [--odmr]         serve one session on fd 0 (inetd, xinetd,
                             systemd Accept=yes, tcpserver), then run the
                             deliveries it kicked and exit
    --queue [--json]         show what is held, per domain
    --flush DOMAIN           deliver DOMAIN now; exit 0 if nothing is left
    --run-queue              one delivery pass over every pushable domain
    --check                  validate the configuration and summarise it

With no arguments at all turnd runs a loopback demo: it listens on
127.0.0.1:2525, spools to ./spool and holds the domain "demo.example",
which any loopback client may release with ETRN to port 2526 of its own
address.  Command-line values override the file.  A bad option or value
is reported in one line on stderr, and turnd exits with status 2.

CONFIGURATION

    [turnd]
    listen = 127.0.0.1:2525      HOST:PORT or [v6]:PORT, comma-separated
    odmr_listen =                the ATRN listener (RFC 2645: port 366)
    smtp_atrn = no               also offer ATRN on the main listener
    hostname =                   our name (default: the FQDN)
    spool = ./spool
    users =                      the users file, name:secret per line
    tls_cert =                   PEM certificate chain  } both set:
    tls_key =                    PEM private key        } STARTTLS
    max_message_size = 10M       K/M/G suffixes
    max_recipients = 100
    max_connections = 100
    max_etrn = 25                ETRN commands per session, then 421
    timeout = 5m                 idle limit per command; s/m/h/d
    retry_interval = 15m         how often fixed-host routes are retried
    queue_lifetime = 5d          then the message is bounced and removed
    smarthost =                  HOST:PORT for bounces and postmaster mail
    delivery_threads = 4         concurrent outbound deliveries, per process
    processes = 1                worker processes sharing the listeners:
                                 one Python process uses one core, so set
                                 this to the number of cores for throughput
    log = stderr                 stderr | syslog | a file name
    user =                       drop to this user after binding

    [domain example.org]
    route = client               client[:PORT] | HOST[:PORT] | hold
    subdomains = no              also hold mail for *.example.org
    etrn_from =                  CIDRs allowed to ETRN, 'any' or 'none'
    owners =                     accounts that may ETRN, TURN and ATRN it
    turn = no                    allow authenticated TURN
    autoturn = no                a connection from etrn_from is a kick

Routes.  HOST[:PORT] is a fixed next hop (port 25 by default, resolved
with getaddrinfo: the standard library has no MX lookup, so name the host
itself).  Mail for it is delivered on ETRN, --flush and every
retry_interval, and anyone may ETRN it unless etrn_from says otherwise,
since a kick only sends the mail where it would go anyway.  client[:PORT]
delivers to the address the ETRN came from, so only an address in
etrn_from or an authenticated owner may kick it.  hold is never pushed;
only TURN or ATRN on the owner's own connection releases it.

Mail for a subdomain held through "subdomains = yes" joins its parent's
queue and travels the parent's route.

ETRN FORMS (RFC 1985 section 5)

    ETRN example.org     that domain (or the held parent of a subdomain)
    ETRN @example.org    that domain and every held domain below it
    ETRN #all            every domain this client may kick

The "@" and "#" forms release only domains for which the client is
explicitly authorised (its address is in etrn_from, or it authenticated as
an owner); "ETRN @com" from a stranger releases nothing and gets 459.
Replies are one line: 253 (n messages started), 251 (nothing waiting),
458 (internal failure), 459 (not allowed, with the reason), 501 (bad
argument), 503 (inside a mail transaction).  A kick for a domain that is
already scheduled or being delivered joins that run.

AUTHENTICATION AND TLS

The users file holds "name:secret" lines; CRAM-MD5 needs the secret
itself, so turnd refuses a users file that group or others can read.
CRAM-MD5 is always offered when a users file is set; PLAIN and LOGIN only
under TLS or on a loopback connection.  Three failures end the session.
STARTTLS is offered when tls_cert and tls_key are set; everything the
client said before the handshake is forgotten, including commands it
pipelined behind STARTTLS (CVE-2011-0411); if no TLS session can be set
up, STARTTLS gets 454.  TURN from an account that owns no TURN-enabled
domain gets "502 5.7.1": RFC 821 section 3.8 names 502 as the refusal.
ATRN naming a domain whose queue is being delivered by another run gets
450 at once, and so does TURN when every one of the account's domains is:
the customer retries later, as RFC 2645 allows.

SIGNALS

SIGTERM and SIGINT stop the daemon: no new connections, idle sessions get
421, a message in DATA and a reversed delivery finish, delivery threads
stop between messages, exit status 0.  SIGHUP reloads the configuration
and the users file; a bad new one is refused and the old one stays.
With processes > 1 a supervisor process passes the signals on to its
workers and starts a new worker if one dies.  Started as root with
"user =", turnd binds its listeners and then runs as that user (in every
mode that touches the spool).

SPOOL

    SPOOL/<domain>/tmp/<id>   being received (locked while written)
    SPOOL/<domain>/new/<id>   queued: one JSON envelope line, then the
                              message exactly as received plus our
                              Received line, with CRLF line ends
    SPOOL/<domain>/lock       flock()ed by whoever delivers the domain
    SPOOL/<domain>/state      last error and next retry time (JSON)
    SPOOL/_smarthost/...      bounces and postmaster mail for the smarthost

A message for two held domains is stored twice, each copy naming only its
own recipients.  The 250 after DATA is sent only after every copy has been
written, fsync()ed, renamed into new/ and the directory fsync()ed.  A file
leaves new/ only when every recipient in it has a final answer; a crash
can make turnd deliver a message twice, never zero times.

POLICIES

* Only held domains, their subdomains where enabled, and postmaster are
  accepted; everything else gets 550 5.7.1.  turnd is never an open relay.
* End of data is only <CR><LF>.<CR><LF>.  A bare CR or bare LF anywhere in
  the data rejects the message with 554 5.6.0 once the real end of data
  has been read (the 2023 SMTP smuggling defence); command lines must end
  in <CR><LF> too.
* Text lines longer than RFC 5321's 1000 octets are accepted and passed
  on unchanged, as Postfix and Exim do; they are read in bounded chunks,
  so they cost no memory.  The message size limit still applies.
* MAIL FROM: and RCPT TO: tolerate a space after the colon.
* MAIL parameters: SIZE= (RFC 1870) and BODY=7BIT or 8BITMIME (RFC 6152).
  Any other BODY value, BINARYMIME included (there is no CHUNKING), gets
  501; an unknown parameter, or any parameter on RCPT, gets 555.
* VRFY answers 252: turnd never reveals which addresses exist.
* A session that draws more than 20 syntax or sequence errors (500, 501,
  502, 503 and the like) is closed with 421 (RFC 5321 section 7.8).
* Replies to HELO and EHLO carry no enhanced status code (RFC 2034 section
  3); every other 2xx, 4xx and 5xx reply does.
* Bounces are RFC 3464 reports sent from <>; a bounce is never bounced.

INETD

    smtp stream tcp nowait mail /usr/bin/python3 python3 /opt/turnd/turnd.py --inetd -c /etc/turnd.conf

In inetd mode logs never go to stdout, and deliveries kicked by ETRN run
after the session has ended, under the same per-domain locks as the daemon.
"""

import argparse
import base64
import binascii
import configparser
import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import logging.handlers
import os
import pwd
import queue
import re
import secrets
import signal
import smtplib
import socket
import socketserver
import ssl
import stat
import sys
import threading
import time
from email.utils import formatdate

__version__ = "1.0"

log = logging.getLogger("turnd")


# ---------------------------------------------------------------------------
# Constants and replies
# ---------------------------------------------------------------------------

CRLF = b"\r\n"

# RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets with its
# CRLF.  SIZE= adds 26 to MAIL (RFC 1870 section 3), AUTH= adds 500 (RFC 4954
# section 3), and an AUTH exchange line may be 12288 octets (RFC 4954 section 4).
MAX_COMMAND_LINE = 512
MAX_MAIL_LINE = 512 + 26 + 500
MAX_AUTH_LINE = 12288
DATA_CHUNK = 65536              # DATA is read in pieces of at most this size
MAX_ENVELOPE_LINE = 1 << 20     # bound on the JSON envelope line of a spool file
MAX_RECEIVED_HEADERS = 100      # RFC 5321 section 6.3: loop detection
MAX_AUTH_FAILURES = 3           # RFC 4954 section 9: not before 3 attempts
MAX_BAD_COMMANDS = 20           # RFC 5321 section 7.8: give up on a noisy client
SMARTHOST_QUEUE = "_smarthost"  # no domain name contains "_", so no clash
LOCK_WAIT = 30.0                # seconds a delivery run waits for another to finish

# Every reply turnd sends, by name.  Tests import this table.  Every 2xx, 4xx
# and 5xx reply carries an RFC 2034 enhanced status code (RFC 3463 numbers);
# 220/221 greeting and closing lines and 3xx replies do not need one.
REPLIES = {
    "greeting": "220 {host} ESMTP turnd ready",
    "odmr_greeting": "220 {host} ESMTP turnd On-Demand Mail Relay ready",
    "bye": "221 2.0.0 {host} closing connection",
    "ok": "250 2.0.0 OK",
    "sender_ok": "250 2.1.0 Sender OK",
    "rcpt_ok": "250 2.1.5 Recipient OK",
    "queued": "250 2.0.0 OK queued as {qid}",
    "vrfy": "252 2.5.0 Cannot VRFY user, but will take mail for held domains",
    "help": "214 2.0.0 Commands: {verbs}",
    "data_go": "354 End data with <CR><LF>.<CR><LF>",
    "etrn_started": "253 2.0.0 {count} pending messages for node {node} started",
    "etrn_empty": "251 2.0.0 No messages waiting for node {node}",
    "etrn_unable": "458 4.3.0 Unable to queue messages for node {node}",
    "etrn_refused": "459 4.7.1 Node {node} not allowed: {reason}",
    "etrn_syntax": "501 5.5.4 Syntax: ETRN [@|#]fully.qualified.domain",
    "etrn_missing": "500 5.5.2 Syntax: ETRN node name required",
    "turn_ok": "250 2.0.0 OK, turning the connection around",
    "turn_disabled": "502 5.5.1 TURN is not enabled",
    "turn_refused": "502 5.7.1 TURN not permitted: no TURN-enabled domain for this account",
    "turn_busy": "450 4.7.0 TURN refused: your domains are being delivered now, retry later",
    "atrn_ok": "250 2.0.0 OK now reversing the connection",
    "atrn_refused": "450 4.7.0 ATRN request refused",
    "atrn_busy": "450 4.7.0 ATRN request refused: {domain} is being delivered now, retry later",
    "atrn_unavailable": "451 4.4.3 Unable to process ATRN request now",
    "atrn_no_mail": "453 4.0.0 You have no mail",
    "atrn_syntax": "501 5.5.4 Syntax: ATRN [domain[,domain]...]",
    "auth_required": "530 5.7.0 Authentication required",
    "auth_challenge": "334 {data}",
    "auth_ok": "235 2.7.0 Authentication successful",
    "auth_failed": "535 5.7.8 Authentication credentials invalid",
    "auth_cancelled": "501 5.7.0 Authentication cancelled",
    "auth_bad_base64": "501 5.5.2 Cannot decode base64",
    "auth_mechanism": "504 5.5.4 Unrecognized authentication mechanism",
    "auth_twice": "503 5.5.1 Already authenticated",
    "auth_too_many": "421 4.7.0 {host} too many authentication failures, closing connection",
    "auth_line_too_long": "500 5.5.6 Authentication exchange line is too long",
    "tls_go": "220 2.0.0 Ready to start TLS",
    "tls_unavailable": "454 4.7.0 TLS not available due to temporary reason",
    "tls_active": "554 5.5.1 TLS already active",
    "not_implemented": "502 5.5.1 Command not implemented",
    "odmr_only": "502 5.5.1 Command not implemented on the ODMR service",
    "unknown": "500 5.5.2 Command not recognized",
    "line_too_long": "500 5.5.2 Line too long",
    "bare_newline": "500 5.5.2 Command lines must end with <CR><LF>",
    "bad_characters": "500 5.5.2 Invalid characters in command",
    "no_parameters": "501 5.5.4 No parameters allowed",
    "syntax": "501 5.5.4 Syntax: {usage}",
    "bad_sender": "501 5.1.7 Bad sender address syntax",
    "bad_recipient": "501 5.1.3 Bad recipient address syntax",
    "bad_size": "501 5.5.4 Bad SIZE parameter",
    "bad_body": "501 5.5.4 BODY must be 7BIT or 8BITMIME",
    "duplicate_parameter": "501 5.5.4 Parameter {param} given twice",
    "unknown_parameter": "555 5.5.4 Unsupported parameter {param}",
    "need_helo": "503 5.5.1 Send HELO or EHLO first",
    "need_mail": "503 5.5.1 Need MAIL before RCPT",
    "need_rcpt": "503 5.5.1 Need RCPT before DATA",
    "nested_mail": "503 5.5.1 Sender already specified",
    "in_transaction": "503 5.5.1 Not permitted inside a mail transaction",
    "relay_denied": "550 5.7.1 Relaying denied: we do not hold mail for {domain}",
    "too_many_recipients": "452 4.5.3 Too many recipients",
    "too_big": "552 5.3.4 Message size exceeds fixed maximum message size",
    "bare_newline_data": "554 5.6.0 Message rejected: bare CR or LF in data (RFC 5321 section 2.3.8)",
    "loop": "554 5.4.6 Too many Received headers: mail loop",
    "storage": "452 4.3.1 Insufficient system storage",
    "local_error": "451 4.3.0 Local error in processing",
    "too_many_errors": "421 4.7.0 {host} too many errors, closing connection",
    "too_many_etrn": "421 4.7.0 {host} too many ETRN commands, closing connection",
    "timeout": "421 4.4.2 {host} idle too long, closing connection",
    "too_busy": "421 4.3.2 {host} too many connections, try again later",
    "shutting_down": "421 4.3.2 {host} shutting down, closing connection",
    "unavailable": "421 4.3.5 Service not available (configuration error), try again later",
}

# RFC 2920 section 3.2: replies to these may be held back and sent as a group;
# every other reply is sent at once.  (All pending replies also go out
# whenever the input buffer runs dry.)
GROUPABLE_VERBS = frozenset({"RSET", "MAIL", "RCPT"})


def reply(name, **fields):
    """Return the canned reply `name` with `fields` filled in, as text."""
    return REPLIES[name].format(**fields)


def printable(text, limit=200):
    """Make untrusted text safe to echo in a reply or log line."""
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text[:limit] + ("..." if len(text) > limit else "")


# ---------------------------------------------------------------------------
# Names, addresses and values
# ---------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def normalize_domain(name, need_dot=True):
    """Return `name` lower-cased if it is a valid DNS host name, else None.

    Only letters, digits and hyphens in labels of 1 to 63 octets (A-labels
    for internationalised names), at most 253 octets in all.  This is the
    only gate between untrusted input and a spool path, so it is strict.
    """
    if not isinstance(name, str) or not name.isascii():
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if need_dot and len(labels) < 2:
        return None
    if not all(_LABEL.match(label) for label in labels):
        return None
    return name


def domain_within(name, parent):
    """True if `name` is `parent` or below it, on label boundaries."""
    return name == parent or name.endswith("." + parent)


_LOCAL_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+\Z")
_LOCAL_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]{1,253}\]\Z")


def parse_path(text, allow_empty=False):
    """Split "<local@domain> PARAMS" into (address, params).

    Raises ValueError if the path is malformed.  A source route
    (<@a,@b:user@c>) is accepted and dropped, as RFC 5321 section 4.1.2
    says.  Returns ("", params) for <> when `allow_empty`.
    """
    text = text.lstrip(" ")
    if not text.startswith("<"):
        raise ValueError("path must be in angle brackets")
    end = _closing_bracket(text)
    path, params = text[1:end], text[end + 1:]
    if params and not params.startswith(" "):
        raise ValueError("junk after path")
    if path.startswith("@"):
        route, colon, path = path.partition(":")
        if not colon:
            raise ValueError("bad source route")
    if path == "":
        if not allow_empty:
            raise ValueError("empty path")
        return "", params.strip()
    if len(path) > 254:
        raise ValueError("path too long")
    local, at, domain = path.rpartition("@")
    if not at:
        if path.lower() == "postmaster":
            return "postmaster", params.strip()
        raise ValueError("no domain")
    if len(local) > 64 or not (_LOCAL_ATOM.match(local) or _LOCAL_QUOTED.match(local)):
        raise ValueError("bad local part")
    if local.startswith(".") or local.endswith(".") or ".." in local and not local.startswith('"'):
        raise ValueError("bad local part")
    if not (normalize_domain(domain, need_dot=False) or _ADDRESS_LITERAL.match(domain)):
        raise ValueError("bad domain")
    return path, params.strip()


def _closing_bracket(text):
    """Index of the ">" closing the path that starts text, quotes respected."""
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    raise ValueError("no closing bracket")


def address_domain(address):
    """The lower-cased domain of an address ("" for a bare local name)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def parse_params(text):
    """Parse ESMTP parameters "A=1 B" into an ordered list of (KEY, value)."""
    params = []
    for word in text.split():
        key, _, value = word.partition("=")
        if not key.replace("-", "").isalnum():
            raise ValueError(word)
        params.append((key.upper(), value))
    return params


_SIZE = re.compile(r"(\d+)\s*([kmg]?)b?\Z", re.I)
_DURATION = re.compile(r"(\d+)\s*([smhd]?)\Z", re.I)


def parse_size(text):
    """'10M' -> 10485760.  Raises ValueError."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError("expected a size such as 512K, 10M or 1G")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def parse_duration(text):
    """'5m' -> 300.0 seconds.  Raises ValueError."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError("expected a duration such as 30s, 5m, 2h or 5d")
    number, unit = int(match.group(1)), match.group(2).lower()
    return float(number * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def parse_hostport(text, default_port=None):
    """'host:25', '[::1]:25' or 'host' -> (host, port).  Raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError("expected [IPv6]:PORT")
    elif text.count(":") > 1:
        host, port = text, ""          # a bare IPv6 address
    else:
        host, _, port = text.partition(":")
    if not port:
        if default_port is None:
            raise ValueError("expected HOST:PORT")
        port = default_port
    try:
        port = int(port)
    except ValueError:
        raise ValueError("port %r is not a number" % port) from None
    if not 0 <= port <= 65535:
        raise ValueError("port %d out of range" % port)
    if host and not _valid_host(host):
        raise ValueError("bad host name %r" % host)
    return host, port


def _address(address):
    """(host, port) -> "host:port", "[v6]:port" or "*:port"."""
    host, port = address[:2]
    return "%s:%d" % ("[%s]" % host if ":" in host else host or "*", port)


def _valid_host(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return normalize_domain(host, need_dot=False) is not None


def parse_networks(text):
    """'10.0.0.0/8, ::1' -> tuple of ip_network; 'any' -> ('any',); 'none' -> ()."""
    words = [w for w in re.split(r"[\s,]+", text.strip()) if w]
    if words == ["any"]:
        return ("any",)
    if words in ([], ["none"]):
        return ()
    try:
        return tuple(ipaddress.ip_network(w, strict=False) for w in words)
    except ValueError as exc:
        raise ValueError("bad network: %s" % exc) from None


def address_in(ip, networks):
    """True if the text address `ip` is in `networks` (see parse_networks)."""
    if not networks or not ip:
        return False
    if networks == ("any",):
        return True
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


def _valid_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def is_loopback(ip):
    try:
        addr = ipaddress.ip_address(ip)
    except (ValueError, TypeError):
        return False
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

class ConfigError(Exception):
    """A configuration problem, worded for the operator: file, key, fix."""


class Route:
    """Where a domain's mail goes: a fixed host, the kicking client, or nowhere.

    kind is "host" (HOST[:PORT]), "client" (client[:PORT]: the address the
    ETRN came from) or "hold" (released only by TURN/ATRN).
    """

    __slots__ = ("kind", "host", "port")

    def __init__(self, kind, host=None, port=25):
        self.kind, self.host, self.port = kind, host, port

    @classmethod
    def parse(cls, text):
        text = text.strip()
        word = text.lower()
        if word == "hold":
            return cls("hold", None, None)
        if word == "client" or word.startswith("client:"):
            return cls("client", None, parse_hostport("x" + text[6:], 25)[1])
        host, port = parse_hostport(text, 25)
        if not host:
            raise ValueError("expected client[:PORT], HOST[:PORT] or hold")
        return cls("host", host, port)

    @property
    def pushable(self):
        """True if turnd can deliver on its own initiative (retry, --flush)."""
        return self.kind == "host"

    def __str__(self):
        if self.kind == "hold":
            return "hold"
        host = self.host or "client"
        return "%s:%d" % ("[%s]" % host if ":" in host else host, self.port)


class DomainConfig:
    """One [domain NAME] section."""

    __slots__ = ("name", "route", "subdomains", "etrn_from", "owners", "turn", "autoturn")

    def __init__(self, name, route, subdomains=False, etrn_from=(), owners=(),
                 turn=False, autoturn=False):
        self.name, self.route, self.subdomains = name, route, subdomains
        self.etrn_from, self.owners = etrn_from, frozenset(owners)
        self.turn, self.autoturn = turn, autoturn


DEFAULTS = {
    "listen": "127.0.0.1:2525",
    "odmr_listen": "",
    "smtp_atrn": "no",
    "hostname": "",
    "spool": "./spool",
    "users": "",
    "tls_cert": "",
    "tls_key": "",
    "max_message_size": "10M",
    "max_recipients": "100",
    "max_connections": "100",
    "max_etrn": "25",
    "timeout": "5m",
    "retry_interval": "15m",
    "queue_lifetime": "5d",
    "smarthost": "",
    "delivery_threads": "4",
    "processes": "1",
    "log": "stderr",
    "user": "",
}
DOMAIN_KEYS = ("route", "subdomains", "etrn_from", "owners", "turn", "autoturn")

# The no-argument demo: a domain that any loopback client may release to
# port 2526 of its own address (see the README's quick start).
DEMO_DOMAIN = ("demo.example", "client:2526", "127.0.0.0/8, ::1")


class Config:
    """Everything turnd was told, checked and immutable once built.

    Built by load_config() in main() and on SIGHUP; a reload builds a new
    Config and swaps the reference, so a session never sees half of one.
    """

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError("Config is immutable")

    def find_domain(self, name):
        """The DomainConfig that holds mail for `name`, or None.

        `name` must already be normalised.  An exact section wins; otherwise
        the nearest parent section with subdomains = yes.
        """
        if name in self.domains:
            return self.domains[name]
        labels = name.split(".")
        for i in range(1, len(labels) - 1):
            parent = self.domains.get(".".join(labels[i:]))
            if parent is not None and parent.subdomains:
                return parent
        return None

    def route_for(self, queue_name):
        """The route of a spool queue (a domain or the smarthost queue)."""
        if queue_name == SMARTHOST_QUEUE:
            if self.smarthost is None:
                return Route("hold", None, None)
            return Route("host", *self.smarthost)
        domain = self.domains.get(queue_name)
        return domain.route if domain else Route("hold", None, None)

    @property
    def turn_enabled(self):
        return any(d.turn for d in self.domains.values())


def _boolean(value):
    word = value.strip().lower()
    if word in ("yes", "true", "on", "1"):
        return True
    if word in ("no", "false", "off", "0", ""):
        return False
    raise ValueError("expected yes or no")


def load_config(path=None, listen=None, spool=None, domains=None, verbose=False):
    """Read `path` (if any), apply command-line overrides, return a Config.

    Raises ConfigError with one line naming the file and key.
    """
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";",), strict=True,
        default_section="\x00none")
    source = path or "command line"
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                parser.read_file(fh)
        except OSError as exc:
            raise ConfigError("%s: cannot read: %s" % (path, exc.strerror)) from None
        except (configparser.Error, UnicodeDecodeError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError("%s: %s" % (path, message)) from None
    for section in parser.sections():
        if section != "turnd" and not section.startswith("domain "):
            raise ConfigError("%s: unknown section [%s]; expected [turnd] or [domain NAME]"
                              % (source, section))
    raw = dict(DEFAULTS)
    if parser.has_section("turnd"):
        for key, value in parser.items("turnd"):
            if key not in DEFAULTS:
                raise ConfigError("%s: [turnd] unknown key %r" % (source, key))
            raw[key] = value
    if listen:
        raw["listen"] = ",".join(listen)
    if spool:
        raw["spool"] = spool

    def check(key, convert):
        try:
            return convert(raw[key])
        except ValueError as exc:
            raise ConfigError("%s: [turnd] %s = %r: %s" % (source, key, raw[key], exc)) from None

    def positive(text):
        value = int(text)
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    def listeners(text):
        addresses = tuple(parse_hostport(part) for part in text.split(",") if part.strip())
        return addresses

    values = {
        "source": source,
        "verbose": verbose,
        "listen": check("listen", listeners),
        "odmr_listen": check("odmr_listen", listeners),
        "smtp_atrn": check("smtp_atrn", _boolean),
        "hostname": check("hostname", lambda v: _hostname(v)),
        "spool": os.path.abspath(raw["spool"].strip() or "./spool"),
        "max_message_size": check("max_message_size", parse_size),
        "max_recipients": check("max_recipients", positive),
        "max_connections": check("max_connections", positive),
        "max_etrn": check("max_etrn", positive),
        "timeout": check("timeout", parse_duration),
        "retry_interval": check("retry_interval", parse_duration),
        "queue_lifetime": check("queue_lifetime", parse_duration),
        "smarthost": check("smarthost", lambda v: parse_hostport(v, 25) if v.strip() else None),
        "delivery_threads": check("delivery_threads", positive),
        "processes": check("processes", positive),
        "log": raw["log"].strip() or "stderr",
        "user": raw["user"].strip(),
        "users_path": raw["users"].strip(),
    }
    if not values["listen"]:
        raise ConfigError("%s: [turnd] listen: at least one HOST:PORT is needed" % source)
    if values["timeout"] < 1:
        raise ConfigError("%s: [turnd] timeout: must be at least 1s" % source)
    values["users"] = load_users(values["users_path"]) if values["users_path"] else {}
    if values["odmr_listen"] and not values["users"]:
        raise ConfigError("%s: [turnd] odmr_listen needs a users file with at least one "
                          "account (ATRN requires AUTH, RFC 2645 section 5.2.1)" % source)
    values["tls"] = _tls_context(source, raw["tls_cert"].strip(), raw["tls_key"].strip())
    values["domains"] = _load_domains(parser, source, domains, path is None)
    for domain in values["domains"].values():
        unknown = sorted(domain.owners - set(values["users"]))
        if unknown:
            raise ConfigError("%s: [domain %s] owners: %s not in the users file%s"
                              % (source, domain.name, ", ".join(unknown),
                                 "" if values["users_path"] else " (no users file is set)"))
    return Config(**values)


def _hostname(value):
    name = value.strip() or socket.getfqdn()
    if not _valid_host(name):
        raise ValueError("not a valid host name")
    return name


def _load_domains(parser, source, extra, demo_allowed):
    domains = {}
    for section in parser.sections():
        if not section.startswith("domain "):
            continue
        name = normalize_domain(section[7:].strip(), need_dot=False)
        if name is None:
            raise ConfigError("%s: [%s]: not a valid domain name" % (source, section))
        items = dict(parser.items(section))
        for key in items:
            if key not in DOMAIN_KEYS:
                raise ConfigError("%s: [%s] unknown key %r" % (source, section, key))
        domains[name] = _domain(source, section, name, items)
    for spec in extra or ():
        name, _, route = spec.partition("=")
        section = "domain " + name
        norm = normalize_domain(name.strip(), need_dot=False)
        if norm is None:
            raise ConfigError("--domain %s: not a valid domain name" % printable(name))
        domains[norm] = _domain("--domain", section, norm, {"route": route or "client"})
    if demo_allowed and not domains and not extra:
        name, route, networks = DEMO_DOMAIN
        domains[name] = _domain("demo", "domain " + name, name,
                                {"route": route, "etrn_from": networks})
    return domains


def _domain(source, section, name, items):
    def check(key, convert, default):
        try:
            return convert(items.get(key, default))
        except ValueError as exc:
            raise ConfigError("%s: [%s] %s = %r: %s"
                              % (source, section, key, items.get(key), exc)) from None

    domain = DomainConfig(
        name,
        route=check("route", Route.parse, "client"),
        subdomains=check("subdomains", _boolean, "no"),
        etrn_from=check("etrn_from", parse_networks, ""),
        owners=check("owners", lambda v: [w for w in re.split(r"[\s,]+", v) if w], ""),
        turn=check("turn", _boolean, "no"),
        autoturn=check("autoturn", _boolean, "no"))
    if domain.turn and not domain.owners:
        raise ConfigError("%s: [%s] turn = yes needs owners (TURN requires AUTH)"
                          % (source, section))
    if domain.autoturn and (domain.route.kind != "client" or not domain.etrn_from
                            or domain.etrn_from == ("any",)):
        raise ConfigError("%s: [%s] autoturn = yes needs route = client and an etrn_from "
                          "list of networks" % (source, section))
    return domain


def load_users(path):
    """Read the users file: {name: secret}.  Raises ConfigError.

    The secrets are stored as given because CRAM-MD5 (RFC 2195) needs them,
    so the file must be private to its owner.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError("users file %s: cannot open: %s" % (path, exc.strerror)) from None
    with os.fdopen(fd, encoding="utf-8", errors="replace") as fh:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError("users file %s is readable by group or others; "
                              "run: chmod 600 %s" % (path, path))
        users = {}
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, colon, secret = line.partition(":")
            if not colon or not name or not secret or not name.isprintable() or " " in name:
                raise ConfigError("users file %s line %d: expected name:secret" % (path, number))
            users[name] = secret
    return users


def _tls_context(source, cert, key):
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("%s: [turnd] tls_cert and tls_key must be set together" % source)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("%s: [turnd] tls_cert/tls_key: cannot load %s / %s: %s"
                          % (source, cert, key, getattr(exc, "strerror", None) or exc)) from None
    return context


# ---------------------------------------------------------------------------
# Spool
# ---------------------------------------------------------------------------

def new_queue_id():
    """A unique, sortable id: microseconds since the epoch in hex, then noise.

    Sorting a queue directory's names therefore sorts by arrival, and a
    message's age can be read from its name without opening it.
    """
    return "%013X%s" % (time.time_ns() // 1000, secrets.token_hex(3).upper())


def queue_id_time(qid):
    """The arrival time encoded in a queue id (0 if it is not one of ours)."""
    try:
        return int(qid[:13], 16) / 1e6
    except ValueError:
        return 0.0


class Envelope:
    """What SMTP said about a message, kept as the first line of its file.

    sender is "" for the null reverse-path <>.  rcpts are the recipients
    still waiting for a final answer.
    """

    FIELDS = ("id", "sender", "rcpts", "arrival", "client", "helo", "body",
              "attempts", "last_error")

    def __init__(self, id, sender, rcpts, arrival=None, client="", helo="",
                 body="", attempts=0, last_error=""):
        self.id, self.sender, self.rcpts = id, sender, list(rcpts)
        self.arrival = time.time() if arrival is None else arrival
        self.client, self.helo, self.body = client, helo, body
        self.attempts, self.last_error = attempts, last_error

    def to_line(self):
        data = {name: getattr(self, name) for name in self.FIELDS}
        return json.dumps(data, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"

    @classmethod
    def from_line(cls, line):
        data = json.loads(line.decode("ascii"))
        return cls(**{name: data[name] for name in cls.FIELDS if name in data})

    def copy(self, **changes):
        values = {name: getattr(self, name) for name in self.FIELDS}
        values.update(changes)
        return Envelope(**values)


class SpoolError(Exception):
    """A spool file that cannot be read or written."""


def fsync_directory(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommit:
    """Directory fsyncs shared by sessions that finish at the same time.

    A message is durable only once the rename into new/ is on disk, which
    takes an fsync of new/ (the 250 waits for it).  Concurrent sessions
    need not each pay for one: the first to arrive becomes the leader and
    fsyncs; those arriving meanwhile wait, and the next of them fsyncs once
    for all of them.  A caller returns only after an fsync that began after
    it registered, i.e. after its own rename, has succeeded; if that fsync
    fails, nobody it covered is released, and each retries (and fails) for
    itself.  A lone session fsyncs at once, exactly as without grouping.
    """

    def __init__(self):
        self.cond = threading.Condition(threading.Lock())
        self.state = {}     # path -> [renames registered, renames synced, fsync running]

    def sync(self, path):
        with self.cond:
            state = self.state.setdefault(path, [0, 0, False])
            state[0] += 1
            mine = state[0]
            while state[1] < mine:
                if state[2]:
                    self.cond.wait()
                    continue
                state[2], covered = True, state[0]
                self.cond.release()
                try:
                    fsync_directory(path)
                finally:
                    self.cond.acquire()
                    state[2] = False
                    self.cond.notify_all()
                state[1] = max(state[1], covered)


class Incoming:
    """A message being received: one locked tmp/ file per destination queue.

    write() appends to every copy; commit() makes them durable and moves
    them into new/ (RFC 5321 section 4.1.1.4: a 250 takes responsibility);
    abort() removes them.  The flock on each tmp file tells clean_tmp() in
    another process that the file is still being written.
    """

    def __init__(self, spool, qid, envelopes):
        self.spool, self.qid, self.files = spool, qid, []
        try:
            for queue_name, envelope in envelopes:
                directory = spool.ensure(queue_name)
                path = os.path.join(directory, "tmp", qid)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fh = os.fdopen(fd, "wb", buffering=DATA_CHUNK)
                self.files.append((directory, fh))
                fh.write(envelope.to_line())
        except BaseException:
            self.abort()
            raise

    def write(self, data):
        for _, fh in self.files:
            fh.write(data)

    def commit(self):
        for _, fh in self.files:
            fh.flush()
            os.fsync(fh.fileno())
        directories = []
        for directory, _ in self.files:
            os.rename(os.path.join(directory, "tmp", self.qid),
                      os.path.join(directory, "new", self.qid))
            directories.append(os.path.join(directory, "new"))
        for path in directories:
            self.spool.sync_directory(path)
        self._close()

    def abort(self):
        for directory, _ in self.files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, "tmp", self.qid))
        self._close()

    def _close(self):
        for _, fh in self.files:
            with contextlib.suppress(OSError):
                fh.close()
        self.files = []


class Spool:
    """The spool directory: one sub-directory per queue (a held domain).

    Queue names reaching a path are either SMARTHOST_QUEUE or names that
    normalize_domain() accepted, so nothing here can leave the spool.
    """

    def __init__(self, root):
        self.root = root
        self.group_commit = GroupCommit()

    def sync_directory(self, path):
        """fsync a queue's new/ directory, shared with concurrent commits."""
        self.group_commit.sync(path)

    def path(self, queue_name, *parts):
        if queue_name != SMARTHOST_QUEUE and normalize_domain(queue_name, need_dot=False) != queue_name:
            raise SpoolError("invalid queue name %r" % queue_name)
        return os.path.join(self.root, queue_name, *parts)

    def ensure(self, queue_name):
        directory = self.path(queue_name)
        for sub in ("tmp", "new"):
            os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
        return directory

    def receive(self, envelopes):
        """Start receiving one message: [(queue, Envelope)] -> Incoming."""
        return Incoming(self, envelopes[0][1].id, envelopes)

    def store(self, queue_name, envelope, data):
        """Queue a complete message (a bounce) durably."""
        incoming = self.receive([(queue_name, envelope)])
        try:
            incoming.write(data)
            incoming.commit()
        except BaseException:
            incoming.abort()
            raise

    def queues(self):
        """Names of the queues present on disk."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n == SMARTHOST_QUEUE
                      or normalize_domain(n, need_dot=False) == n)

    def names(self, queue_name):
        """The queued message names of a queue, oldest first."""
        try:
            return sorted(os.listdir(self.path(queue_name, "new")))
        except FileNotFoundError:
            return []

    def count(self, queue_name):
        return len(self.names(queue_name))

    def open(self, queue_name, name):
        """Open a queued message: (Envelope, file positioned at the data).

        Returns (None, None) if the message has gone (delivered by another
        run).  Raises SpoolError if the file is damaged.
        """
        try:
            fh = open(self.path(queue_name, "new", name), "rb")
        except FileNotFoundError:
            return None, None
        try:
            line = fh.readline(MAX_ENVELOPE_LINE)
            return Envelope.from_line(line), fh
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            fh.close()
            raise SpoolError("%s/%s: damaged envelope: %s" % (queue_name, name, exc)) from None

    def remove(self, queue_name, name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(queue_name, "new", name))

    def rewrite(self, queue_name, name, envelope, data_file):
        """Atomically replace a queued message's envelope, keeping its data."""
        incoming = self.receive([(queue_name, envelope.copy(id=name))])
        try:
            while True:
                block = data_file.read(DATA_CHUNK)
                if not block:
                    break
                incoming.write(block)
            incoming.commit()
        except BaseException:
            incoming.abort()
            raise

    @contextlib.contextmanager
    def lock(self, queue_name, wait=0.0):
        """Hold the queue's delivery lock, or yield False if someone else does.

        flock() works between threads (each call opens its own file) and
        between processes, so concurrent inetd sessions and the daemon never
        deliver the same queue twice at once.  With `wait`, keep trying for
        that many seconds: a kick that arrives while another process is
        delivering must still deliver what that run did not see.
        """
        directory = self.ensure(queue_name)
        fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(0.05)
            yield True
        finally:
            os.close(fd)

    def clean_tmp(self):
        """Remove tmp/ files that nobody is writing: leftovers of a crash."""
        removed = 0
        for queue_name in self.queues():
            tmp = self.path(queue_name, "tmp")
            for name in _listdir(tmp):
                path = os.path.join(tmp, name)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(path)
                    removed += 1
                except OSError:
                    pass            # locked: a live session is writing it
                finally:
                    os.close(fd)
        return removed

    def stats(self, queue_name):
        """(messages, bytes, oldest arrival or None) for a queue."""
        count = size = 0
        oldest = None
        directory = self.path(queue_name, "new")
        for entry in _scandir(directory):
            with contextlib.suppress(OSError):
                size += entry.stat().st_size
                count += 1
                arrival = queue_id_time(entry.name)
                oldest = arrival if oldest is None else min(oldest, arrival)
        return count, size, oldest

    def read_state(self, queue_name):
        try:
            with open(self.path(queue_name, "state"), encoding="utf-8") as fh:
                state = json.load(fh)
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_state(self, queue_name, **state):
        """Record a queue's last error and back-off (advisory, not fsynced)."""
        directory = self.ensure(queue_name)
        temp = os.path.join(directory, "state.%d.%d" % (os.getpid(), threading.get_ident()))
        with open(temp, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(temp, os.path.join(directory, "state"))


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _scandir(path):
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


# ---------------------------------------------------------------------------
# Delivery: turnd as an SMTP client
# ---------------------------------------------------------------------------

class DeliveryError(Exception):
    """The connection to the receiver failed; every undelivered message stays."""


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\b")


def status_of(code, text):
    """The RFC 3463 status for a reply: its own enhanced code, or a default."""
    match = _ENHANCED.match(text)
    if match and match.group(1) == str(code)[0]:
        return "%s.%d.%d" % (match.group(1), int(match.group(2)), int(match.group(3)))
    return "%d.0.0" % (code // 100) if code >= 400 else "4.4.1"


def _text(message):
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return " ".join(printable(part, 300) for part in message.splitlines())


def open_route(host, port, hostname, timeout):
    """Connect to a receiver and greet it; STARTTLS if it offers it.

    TLS is opportunistic (no certificate check: part-time hosts rarely have
    a trusted one).  If the receiver refuses STARTTLS, or the handshake
    fails, the mail goes in the clear and the log says so.
    Raises DeliveryError.
    """
    try:
        smtp = _connect(host, port, hostname, timeout)
        if smtp.has_extn("starttls"):
            code, message = smtp.docmd("STARTTLS")
            if code != 220:
                log.warning("%s:%d refused STARTTLS (%d %s); sending in the clear",
                            host, port, code, _text(message))
                return smtp
            try:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                smtp.sock = context.wrap_socket(smtp.sock, server_hostname=host)
                smtp.file = None
                smtp.helo_resp = smtp.ehlo_resp = None
                smtp.esmtp_features = {}
                smtp.does_esmtp = False
                _greet(smtp)
            except (ssl.SSLError, OSError) as exc:
                log.warning("%s:%d TLS handshake failed (%s); retrying in the clear",
                            host, port, exc)
                smtp.close()
                smtp = _connect(host, port, hostname, timeout)
        return smtp
    except (OSError, smtplib.SMTPException) as exc:
        raise DeliveryError("%s:%d: %s" % (host, port, _text(str(exc)) or type(exc).__name__)) from None


def _connect(host, port, hostname, timeout):
    smtp = smtplib.SMTP(local_hostname=hostname, timeout=timeout)
    code, message = smtp.connect(host, port)
    if code != 220:
        smtp.close()
        raise smtplib.SMTPConnectError(code, message)
    _greet(smtp)
    return smtp


def _greet(smtp):
    code, message = smtp.ehlo()
    if code != 250:
        code, message = smtp.helo()
        if code != 250:
            raise smtplib.SMTPHeloError(code, message)


def reversed_client(sock, reader, hostname, timeout):
    """After TURN/ATRN: be the client on the customer's own connection.

    RFC 821 section 4.1.1 and RFC 2645 section 5.3: the customer now sends
    its 220 greeting (possibly multi-line); we answer with EHLO.
    Raises DeliveryError.
    """
    smtp = smtplib.SMTP(local_hostname=hostname, timeout=timeout)
    smtp.sock, smtp.file = sock, reader
    sock.settimeout(timeout)
    try:
        code, message = smtp.getreply()
        if code != 220:
            # RFC 5321 section 3.1: after a 554 greeting the client says QUIT.
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()
            raise DeliveryError("customer greeted with %d %s" % (code, _text(message)))
        _greet(smtp)
    except (OSError, smtplib.SMTPException) as exc:
        raise DeliveryError("customer: %s" % (_text(str(exc)) or type(exc).__name__)) from None
    return smtp


def send_message(smtp, envelope, data_file):
    """Send one queued message; return {recipient: (code, text)}.

    Uses PIPELINING when offered (RFC 2920): MAIL, every RCPT and DATA in
    one write.  The data is streamed from the spool file and dot-stuffed
    on the way (RFC 5321 section 4.5.2).  Raises OSError or SMTPException
    if the connection fails.
    """
    rcpts = envelope.rcpts
    size = os.fstat(data_file.fileno()).st_size - data_file.tell()
    options = []
    if envelope.body == "8BITMIME":
        if not smtp.has_extn("8bitmime"):
            # RFC 6152 section 3: never send 8-bit data to a 7-bit receiver.
            text = "5.6.3 Receiver does not accept 8-bit (8BITMIME) messages"
            return {rcpt: (554, text) for rcpt in rcpts}
        options.append(" BODY=8BITMIME")
    if smtp.has_extn("size"):
        options.append(" SIZE=%d" % size)
    commands = ["MAIL FROM:<%s>%s" % (envelope.sender, "".join(options))]
    commands += ["RCPT TO:<%s>" % rcpt for rcpt in rcpts]
    if smtp.has_extn("pipelining"):
        smtp.send("\r\n".join(commands + ["DATA"]) + "\r\n")
        mail = smtp.getreply()
        answers = [smtp.getreply() for _ in rcpts]
        data = smtp.getreply()
    else:
        mail = smtp.docmd(commands[0])
        answers = [smtp.docmd(c) for c in commands[1:]] if mail[0] == 250 else [mail] * len(rcpts)
        ok = mail[0] == 250 and any(code in (250, 251) for code, _ in answers)
        data = smtp.docmd("DATA") if ok else None
    outcome = {}
    accepted = []
    for rcpt, (code, message) in zip(rcpts, answers):
        if mail[0] != 250:
            code, message = mail
        if code in (250, 251):
            accepted.append(rcpt)
        else:
            outcome[rcpt] = (code, _text(message))
    if data is not None and data[0] == 354:
        if not accepted:
            smtp.send(".\r\n")      # RFC 2920 section 3.2: end the empty message
            smtp.getreply()
        else:
            _send_data(smtp.sock, data_file)
            data = smtp.getreply()
    if data is None or data[0] != 250 or not accepted:
        if mail[0] != 421 and (data is None or data[0] != 421):
            smtp.rset()
    final = data if data is not None else (451, b"4.3.0 DATA not sent")
    for rcpt in accepted:
        outcome[rcpt] = (final[0], _text(final[1]))
    if mail[0] == 421 or final[0] == 421:
        raise DeliveryError("receiver closing: 421 %s" % _text(final[1] if final[0] == 421 else mail[1]))
    return outcome


def _send_data(sock, data_file):
    """Stream message data, dot-stuffed, then the end-of-data line.

    Spool files contain only CRLF line ends (bare CR and LF are refused on
    the way in), so every LF starts a line and one replace() per block
    suffices; a block boundary that falls at a line start is handled by
    at_line_start.
    """
    at_line_start, last, out = True, b"\r\n", b""
    while True:
        block = data_file.read(DATA_CHUNK)
        if not block:
            break
        sock.sendall(out)
        out = block.replace(b"\n.", b"\n..")
        if at_line_start and out.startswith(b"."):
            out = b"." + out
        # Keep the last two octets across blocks: the final CRLF may be split
        # between two reads, and a second CRLF would add a line to the message.
        at_line_start, last = block.endswith(b"\n"), (last + block[-2:])[-2:]
    # The end-of-data line goes out in the same write as the last block: in
    # a write of its own, Nagle's algorithm would hold it until the receiver's
    # delayed ACK (40 ms or more) for every message delivered.
    sock.sendall(out + (b".\r\n" if last.endswith(b"\r\n") else b"\r\n.\r\n"))


def read_headers(data_file, limit=65536):
    """The header section of a message (for a bounce), at most `limit` bytes."""
    lines, total = [], 0
    while total < limit:
        line = data_file.readline(limit - total)
        if not line or line in (b"\r\n", b"\n"):
            break
        lines.append(line)
        total += len(line)
    return b"".join(lines)


def make_dsn(hostname, envelope, failures, headers, action="failed"):
    """Build an RFC 3464 delivery status notification (a bounce) as bytes.

    failures: [(recipient, status, diagnostic text, remote MTA or "")].
    """
    boundary = "%s/%s" % (envelope.id, hostname)
    now = formatdate(localtime=True)
    human = ["This is the mail system at host %s." % hostname, "",
             "Your message could not be delivered to the recipients below.", ""]
    for rcpt, status, diagnostic, _ in failures:
        human.append("<%s>: %s" % (rcpt, diagnostic or status))
    status_lines = ["Reporting-MTA: dns; %s" % hostname,
                    "Arrival-Date: %s" % formatdate(envelope.arrival, localtime=True)]
    if envelope.helo or envelope.client:
        status_lines.append("Received-From-MTA: dns; %s (%s)"
                            % (printable(envelope.helo) or "unknown", envelope.client))
    for rcpt, status, diagnostic, remote in failures:
        status_lines += ["", "Final-Recipient: rfc822; %s" % rcpt,
                         "Action: %s" % action, "Status: %s" % status]
        if remote:
            # "host:port" in our logs; RFC 3464 section 2.3.5 wants the name alone.
            status_lines.append("Remote-MTA: dns; %s" % re.sub(r":\d+$", "", remote))
        if diagnostic:
            status_lines.append("Diagnostic-Code: smtp; %s" % printable(diagnostic, 900))
        status_lines.append("Last-Attempt-Date: %s" % now)
    head = ["From: Mail Delivery System <MAILER-DAEMON@%s>" % hostname,
            "To: <%s>" % envelope.sender,
            "Subject: Undelivered Mail Returned to Sender",
            "Date: %s" % now,
            "Message-ID: <%s.%s@%s>" % (envelope.id, new_queue_id(), hostname),
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="%s"'
            % boundary,
            "", "This is a MIME-encapsulated message.", "",
            "--" + boundary, "Content-Description: Notification",
            "Content-Type: text/plain; charset=us-ascii", ""] + human + [
            "", "--" + boundary, "Content-Description: Delivery report",
            "Content-Type: message/delivery-status", ""] + status_lines + [
            "", "--" + boundary, "Content-Description: Undelivered message headers",
            "Content-Type: text/rfc822-headers", "", ""]
    text = "\r\n".join(head).encode("ascii")
    original = headers if headers.endswith(b"\r\n") or not headers else headers + b"\r\n"
    return text + original + ("\r\n--%s--\r\n" % boundary).encode("ascii")


class Deliverer:
    """Runs deliveries: a few threads fed by kicks, plus the retry timer.

    A kick names a queue and, for client routes, the address to deliver to.
    A kick for a queue that is already waiting joins that run; a kick for a
    queue being delivered makes the run look again when it finishes.  So a
    storm of ETRNs never starts more than one delivery per domain, and the
    spool lock keeps other processes out too.
    """

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.waiting = {}       # queue -> target, kicked but not started
        self.running = {}       # queue -> [look again?, newest target]
        self.work = queue.Queue()
        self.threads = []

    # -- kicks ----------------------------------------------------------------

    def kick(self, queue_name, target=None):
        """Ask for `queue_name` to be delivered (to `target` for client routes)."""
        with self.lock:
            if queue_name in self.running:
                self.running[queue_name] = [True, target or self.running[queue_name][1]]
            elif queue_name in self.waiting:
                self.waiting[queue_name] = target or self.waiting[queue_name]
            else:
                self.waiting[queue_name] = target
                self.work.put(queue_name)

    def start(self, threads, timer=True):
        """Start the delivery threads, and the retry timer unless told not to
        (with several processes only the first runs it)."""
        for number in range(threads):
            thread = threading.Thread(target=self._worker, name="delivery-%d" % number,
                                      daemon=True)
            thread.start()
            self.threads.append(thread)
        if timer:
            thread = threading.Thread(target=self._timer, name="retry-timer", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, deadline):
        for _ in self.threads:
            self.work.put(None)
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def run_pending(self):
        """Run every waiting kick in this thread (inetd mode, --flush, --run-queue)."""
        while True:
            try:
                queue_name = self.work.get_nowait()
            except queue.Empty:
                return
            if queue_name is not None:
                self._run(queue_name)

    def _worker(self):
        while True:
            queue_name = self.work.get()
            if queue_name is None:
                return
            try:
                self._run(queue_name)
            except Exception:
                log.exception("delivery of %s failed unexpectedly", queue_name)

    def _run(self, queue_name):
        with self.lock:
            target = self.waiting.pop(queue_name, None)
            self.running[queue_name] = [False, target]
        try:
            while True:
                self.deliver(queue_name, target)
                with self.lock:
                    again, target = self.running[queue_name]
                    if not again or self.app.stopping.is_set():
                        del self.running[queue_name]
                        return
                    self.running[queue_name] = [False, target]
        except BaseException:
            with self.lock:
                self.running.pop(queue_name, None)
            raise

    def _timer(self):
        """Retry fixed-host routes every retry_interval; expire old mail."""
        startup = True
        while True:
            try:
                self.scan(startup)
            except Exception:
                # One bad scan must not end every future retry.
                log.exception("retry scan failed")
            startup = False
            if self.app.stopping.wait(min(self.app.config.retry_interval, 60.0)):
                return

    def scan(self, startup=False):
        """Kick every queue due for a retry, or holding mail past its lifetime."""
        config, spool, now = self.app.config, self.app.spool, time.time()
        for queue_name in spool.queues():
            try:
                names = spool.names(queue_name)
            except OSError as exc:
                # One unreadable queue must not stop the retry timer for all.
                log.error("cannot read queue %s: %s", queue_name, exc)
                continue
            if not names:
                continue
            expired = now - queue_id_time(names[0]) > config.queue_lifetime
            route = config.route_for(queue_name)
            due = route.pushable and (
                startup or spool.read_state(queue_name).get("next_retry", 0) <= now)
            if due or expired:
                self.kick(queue_name)

    # -- one delivery run -------------------------------------------------------

    def deliver(self, queue_name, target=None):
        """Deliver a queue to its route; return True if the queue is empty after.

        `target` is the client address for client routes.  Without a usable
        route (hold, or client with no address) only expired mail is handled.
        """
        config = self.app.config
        route = config.route_for(queue_name)
        host = route.host if route.kind == "host" else target if route.kind == "client" else None
        connection = []

        def connect():
            if host is None:
                return None
            if not connection:
                connection.append(open_route(host, route.port, config.hostname,
                                             config.timeout))
                log.info("delivering %s to %s:%d", queue_name, host, route.port)
            return connection[0]

        with self.app.spool.lock(queue_name, wait=LOCK_WAIT) as locked:
            if not locked:
                log.info("%s is still being delivered by another run; leaving it to that run",
                         queue_name)
                return False
            try:
                remote = "%s:%d" % (host, route.port or 25)
                reasons = []
                deferred = self.deliver_queue(queue_name, connect, remote, reasons)
                if connection:
                    with contextlib.suppress(OSError, smtplib.SMTPException):
                        connection[0].quit()
                if deferred:
                    # The receiver's own words, for --queue's LAST ERROR column.
                    raise DeliveryError("%d message(s) deferred by %s: %s"
                                        % (deferred, remote, reasons[0]))
                self.app.spool.write_state(queue_name)
            except DeliveryError as exc:
                log.warning("delivery of %s deferred: %s", queue_name, exc)
                self.app.spool.write_state(queue_name, last_error=str(exc),
                                           next_retry=time.time() + config.retry_interval)
                if connection:
                    connection[0].close()
                return False
        return self.app.spool.count(queue_name) == 0

    def deliver_queue(self, queue_name, connect, remote="", reasons=None):
        """Offer every message of a queue to connect()'s SMTP connection.

        connect() returns a connected smtplib.SMTP, or None if there is no
        route (then only expired messages are dealt with).  The caller holds
        the queue's lock.  Returns how many messages are still waiting for
        some recipient, appending why to `reasons` if given.  Raises
        DeliveryError if the connection fails; messages not yet delivered
        stay queued.
        """
        spool, config = self.app.spool, self.app.config
        deferred = 0
        for name in spool.names(queue_name):
            if self.app.stopping.is_set():
                break
            try:
                envelope, data_file = spool.open(queue_name, name)
            except SpoolError as exc:
                log.error("%s", exc)
                continue
            if envelope is None:
                continue
            with data_file:
                if time.time() - envelope.arrival > config.queue_lifetime:
                    self.expire(queue_name, name, envelope, data_file)
                    continue
                smtp = connect()
                if smtp is None:
                    continue
                data_start = data_file.tell()
                try:
                    outcome = send_message(smtp, envelope, data_file)
                except (OSError, smtplib.SMTPException) as exc:
                    raise DeliveryError("%s: %s" % (remote, _text(str(exc)) or
                                                    type(exc).__name__)) from None
                except DeliveryError as exc:
                    outcome, failure = {}, exc
                else:
                    failure = None
                data_file.seek(data_start)
                why = self.settle(queue_name, name, envelope, data_file, outcome, remote)
                if why:
                    deferred += 1
                    if reasons is not None:
                        reasons.append(why)
                if failure:
                    raise failure
        return deferred

    def settle(self, queue_name, name, envelope, data_file, outcome, remote):
        """Act on one message's per-recipient outcome; return why some wait, or ""."""
        spool = self.app.spool
        delivered, failed, waiting = [], [], []
        for rcpt in envelope.rcpts:
            code, text = outcome.get(rcpt, (451, "4.4.2 Connection lost"))
            if 200 <= code < 300:
                delivered.append(rcpt)
            elif 500 <= code < 600:
                failed.append((rcpt, status_of(code, text), "%d %s" % (code, text), remote))
            else:
                waiting.append((rcpt, "%d %s" % (code, text)))
        for rcpt in delivered:
            log.info("%s delivered to <%s> via %s: %s", envelope.id, rcpt, remote,
                     " ".join(map(str, outcome[rcpt])))
        if failed:
            self.bounce(envelope, failed, data_file)
        if waiting:
            for rcpt, why in waiting:
                log.info("%s deferred for <%s>: %s", envelope.id, rcpt, why)
            if len(waiting) < len(envelope.rcpts):
                data_file.seek(0)
                data_file.readline(MAX_ENVELOPE_LINE)
                spool.rewrite(queue_name, name, envelope.copy(
                    rcpts=[r for r, _ in waiting], attempts=envelope.attempts + 1,
                    last_error=waiting[0][1]), data_file)
            return waiting[0][1]
        spool.remove(queue_name, name)
        return ""

    def expire(self, queue_name, name, envelope, data_file):
        """queue_lifetime has passed: bounce every recipient and drop it."""
        why = (envelope.last_error or self.app.spool.read_state(queue_name).get("last_error")
               or "no successful delivery within the queue lifetime")
        failures = [(rcpt, "4.4.7", "Delivery time expired: " + why, "")
                    for rcpt in envelope.rcpts]
        log.warning("%s expired in %s after %.0f s", envelope.id, queue_name,
                    time.time() - envelope.arrival)
        self.bounce(envelope, failures, data_file)
        self.app.spool.remove(queue_name, name)

    def bounce(self, envelope, failures, data_file):
        """Queue a DSN to the sender (RFC 3464; RFC 5321 section 6.1).

        It goes into the sender's domain queue if we hold that domain, else
        to the smarthost queue (kept there if no smarthost is set).  Mail
        from <> is never bounced: that would risk a loop of bounces.
        """
        for rcpt, status, diagnostic, _ in failures:
            log.warning("%s bounced for <%s>: %s %s", envelope.id, rcpt, status, diagnostic)
        if not envelope.sender:
            log.warning("%s: not bouncing a message from <>", envelope.id)
            return
        config = self.app.config
        held = config.find_domain(address_domain(envelope.sender) or "-")
        queue_name = held.name if held else SMARTHOST_QUEUE
        data = make_dsn(config.hostname, envelope, failures, read_headers(data_file))
        received = received_line("localhost", "127.0.0.1", config.hostname, "SMTP",
                                 new_queue_id())
        # The returned headers may hold 8-bit octets (an 8BITMIME original):
        # then the DSN must travel as BODY=8BITMIME too (RFC 6152 section 3).
        dsn = Envelope(new_queue_id(), "", [envelope.sender], client="127.0.0.1",
                       helo=config.hostname, body="8BITMIME" if max(data) > 0x7F else "7BIT")
        self.app.spool.store(queue_name, dsn, received + data)
        log.info("%s: bounce %s queued in %s for <%s>", envelope.id, dsn.id, queue_name,
                 envelope.sender)
        if config.route_for(queue_name).pushable:
            self.kick(queue_name)       # send it now, not at the next retry scan


def received_line(helo, client_ip, hostname, protocol, qid):
    """The RFC 5321 section 4.4 trace line, with untrusted parts sanitised.

    The HELO name comes from the client, so anything but the characters of
    a host name or address literal is replaced: no header can be injected.
    """
    safe_helo = re.sub(r"[^A-Za-z0-9.:\[\]-]", "?", helo or "unknown")[:255]
    return ("Received: from %s ([%s])\r\n\tby %s (turnd %s) with %s id %s;\r\n\t%s\r\n"
            % (safe_helo, client_ip or "unknown", hostname, __version__, protocol, qid,
               formatdate(localtime=True))).encode("ascii", "replace")


# ---------------------------------------------------------------------------
# The SMTP session
# ---------------------------------------------------------------------------

class LineReader:
    """Bounded line reading from a socket, with our own input buffer.

    Owning the buffer lets the session keep two RFC promises exactly:
    pending replies are sent whenever the input buffer runs dry (RFC 2920
    section 3.2), and whatever a client pipelined behind STARTTLS is thrown
    away with the reader (RFC 3207 section 4.2; CVE-2011-0411).  smtplib can also read
    through it after TURN/ATRN, since it has readline(limit) and close().
    """

    def __init__(self, sock, before_blocking):
        self.sock, self.before_blocking = sock, before_blocking
        self.buffer = bytearray()
        # The socket's timeout bounds a whole line, not each recv(): a client
        # trickling one byte per (timeout - 1) seconds must not hold a session
        # and a connection slot for ever (as Postfix's smtpd_per_record_deadline).
        self.timeout = sock.gettimeout()

    def readline(self, limit=-1):
        """Return one line (ending in LF), or at most `limit` bytes of one.

        A partial line never ends with CR, so a CRLF is never split.
        Returns b"" at end of input.  Raises socket.timeout if the line (or
        the `limit` bytes) did not arrive within the socket's timeout.
        """
        limit = limit if limit and limit > 0 else 1 << 30
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        start = 0
        while True:
            end = self.buffer.find(b"\n", start, limit)
            if end >= 0:
                return self._take(end + 1)
            if len(self.buffer) >= limit:
                cut = limit - 1 if self.buffer[limit - 1:limit] == b"\r" and limit > 1 else limit
                return self._take(cut)
            start = len(self.buffer)
            self.before_blocking()
            data = self._recv(deadline)
            if not data:
                return self._take(len(self.buffer))
            self.buffer += data

    def _recv(self, deadline):
        if deadline is None:
            return self.sock.recv(DATA_CHUNK)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("no complete line within %g s" % self.timeout)
        if self.timeout - remaining < 0.01 and self.sock.gettimeout() == self.timeout:
            # The first read of a line: the socket already has (within 10 ms)
            # the time left.  Each settimeout() is an ioctl that drops the GIL,
            # and two per read were a fifth of the context switches of a
            # one-message session.
            return self.sock.recv(DATA_CHUNK)
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(DATA_CHUNK)
        finally:
            with contextlib.suppress(OSError):      # closed: the next call says so
                self.sock.settimeout(self.timeout)  # replies get the full timeout

    def skip_line(self):
        """Discard input up to and including the next LF, in bounded pieces."""
        while True:
            piece = self.readline(DATA_CHUNK)
            if not piece or piece.endswith(b"\n"):
                return

    def close(self):
        """For smtplib, which closes its file: the session owns the socket."""

    def _take(self, count):
        line = bytes(self.buffer[:count])
        del self.buffer[:count]
        return line


class Transaction:
    """One mail transaction: MAIL, RCPTs, DATA (RFC 5321 section 3.3)."""

    def __init__(self, sender, body=""):
        self.sender, self.body = sender, body
        self.queues = {}        # queue name -> [recipients], in RCPT order

    @property
    def count(self):
        return sum(len(r) for r in self.queues.values())


class SessionEnd(Exception):
    """Raised to end a session after a final reply has been pushed."""


class AuthAbort(Exception):
    """An AUTH exchange ended early; args[0] names the reply."""


class SMTPHandler(socketserver.StreamRequestHandler):
    """One SMTP session.  Verbs are smtp_<VERB> methods, found by name.

    Connection state lives on the handler (HELO name, TLS, the account);
    transaction state lives in self.transaction and is cleared by reset().
    self.server provides .app (the running Turnd) and .odmr (True on the
    RFC 2645 listener, where only EHLO, AUTH, ATRN and QUIT make sense).
    """

    ODMR_BEFORE_AUTH = frozenset({"EHLO", "HELO", "AUTH", "ATRN", "QUIT", "NOOP", "RSET",
                                  "STARTTLS"})
    ODMR_AFTER_AUTH = frozenset({"ATRN", "QUIT"})

    # -- set-up, the command loop, replies ------------------------------------

    def setup(self):
        self.app = self.server.app
        self.config = self.app.config           # one configuration per session
        self.odmr = self.server.odmr
        self.connection = self.request
        self.connection.settimeout(self.config.timeout)
        self.peer = _peer_ip(self.client_address)
        self.reader = LineReader(self.connection, self.flush)
        self.pending = []
        self.helo = None
        self.esmtp = self.tls = False
        self.user = None
        self.transaction = None
        self.closing = self.in_data = False
        self.auth_failures = self.errors = self.etrn_count = self.accepted = 0
        self.started = time.monotonic()

    def handle(self):
        log.info("connection from [%s]%s", self.peer, " (ODMR)" if self.odmr else "")
        self.app.sessions.add(self)
        try:
            self.push(reply("odmr_greeting" if self.odmr else "greeting",
                            host=self.config.hostname))
            self.flush()
            self.autoturn()
            while not self.closing:
                self.serve_command()
                if self.app.stopping.is_set() and not self.closing:
                    self.close_with("shutting_down")
        except SessionEnd:
            pass
        except socket.timeout:
            log.info("[%s] timed out", self.peer)
            # close_with() ends with SessionEnd, which the clause above cannot
            # catch from here; left alone it would reach handle_error().
            with contextlib.suppress(SessionEnd):
                self.close_with("timeout", quiet=True)
        except (OSError, ssl.SSLError) as exc:
            log.info("[%s] connection lost: %s", self.peer, exc)
        except Exception:
            log.exception("[%s] unexpected error", self.peer)
            with contextlib.suppress(SessionEnd):
                self.close_with("local_error", quiet=True)
        finally:
            self.app.sessions.discard(self)
            log.info("session with [%s] ended: %d message(s) accepted in %.1f s",
                     self.peer, self.accepted, time.monotonic() - self.started)

    def finish(self):
        with contextlib.suppress(OSError):
            self.flush()
        if self.connection is not self.request:
            # After STARTTLS the TLS socket owns the descriptor (wrap_socket
            # detached self.request), so socketserver's close of the request
            # would leave the client waiting for EOF after our 221 or 421.
            with contextlib.suppress(OSError):
                self.connection.close()

    def serve_command(self):
        line = self.reader.readline(MAX_AUTH_LINE + 2)
        if not line:
            if self.app.stopping.is_set():
                # shutdown() cut our input; RFC 5321 section 3.8: say 421 first.
                self.close_with("shutting_down", quiet=True)
            log.info("[%s] closed the connection without QUIT", self.peer)
            self.closing = True
            return
        if not line.endswith(b"\n"):
            self.reader.skip_line()
            return self.error("line_too_long")
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            return self.error("bare_newline")
        try:
            text = line[:-2].decode("ascii")
        except UnicodeDecodeError:
            return self.error("bad_characters")
        if not text.isprintable():
            return self.error("bad_characters")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if self.config.verbose:
            shown = text if verb != "AUTH" else verb + " " + arg.partition(" ")[0] + " ..."
            log.debug("[%s] < %s", self.peer, shown)
        limit = {"MAIL": MAX_MAIL_LINE, "AUTH": MAX_AUTH_LINE + 2}.get(verb, MAX_COMMAND_LINE)
        if len(line) > limit:
            return self.error("line_too_long")
        method = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
        if method is None:
            return self.error("unknown")
        if self.odmr and verb not in (self.ODMR_AFTER_AUTH if self.user else self.ODMR_BEFORE_AUTH):
            return self.error("odmr_only")
        method(arg.strip(" "))
        if verb not in GROUPABLE_VERBS:
            self.flush()

    def push(self, text):
        """Queue a reply line; flush() sends what is queued."""
        if self.config.verbose:
            log.debug("[%s] > %s", self.peer, text)
        self.pending.append(text.encode("ascii", "replace") + CRLF)

    def push_multiline(self, code, lines):
        """A multi-line reply (RFC 5321 section 4.2.1): code-text ... code text."""
        for line in lines[:-1]:
            self.push("%d-%s" % (code, line))
        self.push("%d %s" % (code, lines[-1]))

    def flush(self):
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            self.connection.sendall(data)

    def error(self, name, **fields):
        """Answer a bad command; end a session that keeps sending them."""
        self.push(reply(name, **fields))
        self.errors += 1
        if self.errors > MAX_BAD_COMMANDS:
            self.close_with("too_many_errors")
        self.flush()

    def close_with(self, name, quiet=False):
        """Send a final reply (421 or 221) and end the session."""
        self.closing = True
        try:
            self.push(reply(name, host=self.config.hostname))
            self.flush()
        except OSError:
            if not quiet:
                raise
        raise SessionEnd()

    def reset(self):
        """Forget the mail transaction (RSET, EHLO, HELO, end of DATA)."""
        self.transaction = None

    # -- greeting and session commands -----------------------------------------

    def smtp_EHLO(self, arg):
        if not arg:
            return self.error("syntax", usage="EHLO hostname")
        self.reset()
        self.helo, self.esmtp = arg, True
        self.push_multiline(250, [self.config.hostname] + self.extensions())

    def smtp_HELO(self, arg):
        if not arg:
            return self.error("syntax", usage="HELO hostname")
        self.reset()
        self.helo, self.esmtp = arg, False
        self.push("250 %s" % self.config.hostname)

    def extensions(self):
        """The EHLO keywords: only what will work right now (RFC 5321 s. 4.2.4)."""
        config, words = self.config, []
        if not self.odmr:
            words += ["PIPELINING", "SIZE %d" % config.max_message_size, "8BITMIME", "ETRN"]
        if config.tls is not None and not self.tls:
            words.append("STARTTLS")
        mechanisms = self.mechanisms()
        if mechanisms:
            words.append("AUTH " + " ".join(mechanisms))
        if config.turn_enabled and not self.odmr:
            words.append("TURN")
        if (self.odmr or config.smtp_atrn) and config.users:
            words.append("ATRN")
        words.append("ENHANCEDSTATUSCODES")
        if not self.odmr:
            words.append("HELP")
        return words

    def smtp_NOOP(self, arg):
        self.push(reply("ok"))

    def smtp_RSET(self, arg):
        if arg:
            return self.error("no_parameters")
        self.reset()
        self.push(reply("ok"))

    def smtp_QUIT(self, arg):
        if arg:
            return self.error("no_parameters")
        self.close_with("bye")

    def smtp_VRFY(self, arg):
        # RFC 5321 section 7.3: a site that will not verify says 252.
        if not arg:
            return self.error("syntax", usage="VRFY address")
        self.push(reply("vrfy"))

    def smtp_EXPN(self, arg):
        self.push(reply("not_implemented"))

    def smtp_HELP(self, arg):
        # Only the verbs that work in this session, like the EHLO keywords.
        verbs = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP"]
        keywords = [word.split()[0] for word in self.extensions()]
        verbs += [verb for verb in ("ETRN", "STARTTLS", "AUTH", "TURN", "ATRN") if verb in keywords]
        self.push(reply("help", verbs=" ".join(verbs)))

    # -- the mail transaction ---------------------------------------------------

    def smtp_MAIL(self, arg):
        if self.helo is None:
            return self.error("need_helo")
        if self.transaction is not None:
            return self.error("nested_mail")
        if not arg[:5].upper() == "FROM:":
            return self.error("syntax", usage="MAIL FROM:<address>")
        try:
            sender, rest = parse_path(arg[5:], allow_empty=True)
            params = parse_params(rest)
        except ValueError:
            return self.error("bad_sender")
        if sender == "postmaster":
            return self.error("bad_sender")
        seen, size, body = set(), 0, ""
        for key, value in params:
            if key in seen:
                return self.error("duplicate_parameter", param=key)
            seen.add(key)
            if key == "SIZE":
                if not value.isdigit() or len(value) > 20:
                    return self.error("bad_size")
                size = int(value)
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return self.error("bad_body")
                body = value.upper()
            elif key == "AUTH" and self.mechanisms():
                pass    # RFC 4954 section 5: accepted, and treated as AUTH=<>
            else:
                return self.error("unknown_parameter", param=printable(key, 40))
        if size > self.config.max_message_size:
            return self.push(reply("too_big"))
        self.transaction = Transaction(sender, body)
        self.push(reply("sender_ok"))

    def smtp_RCPT(self, arg):
        if self.transaction is None:
            return self.error("need_mail")
        if not arg[:3].upper() == "TO:":
            return self.error("syntax", usage="RCPT TO:<address>")
        try:
            rcpt, rest = parse_path(arg[3:])
        except ValueError:
            return self.error("bad_recipient")
        if rest:
            key = rest.split()[0].partition("=")[0]
            return self.error("unknown_parameter", param=printable(key, 40))
        queue_name = self.queue_for(rcpt)
        if queue_name is None:
            return self.push(reply("relay_denied", domain=printable(address_domain(rcpt), 100)))
        if self.transaction.count >= self.config.max_recipients:
            return self.push(reply("too_many_recipients"))
        rcpts = self.transaction.queues.setdefault(queue_name, [])
        if rcpt not in rcpts:
            rcpts.append(rcpt)
        self.push(reply("rcpt_ok"))

    def queue_for(self, rcpt):
        """The spool queue for a recipient, or None: we do not relay for it.

        Held domains (and their subdomains where enabled) go to their own
        queue; postmaster, bare or at our hostname, goes to the smarthost
        queue, as RFC 5321 section 4.5.1 requires us to accept it.
        """
        if rcpt == "postmaster":
            return SMARTHOST_QUEUE
        local, _, domain = rcpt.rpartition("@")
        name = normalize_domain(domain, need_dot=False)
        if name is None:
            return None
        if local.lower() == "postmaster" and name == self.config.hostname.lower():
            return SMARTHOST_QUEUE
        held = self.config.find_domain(name)
        return held.name if held else None

    def smtp_DATA(self, arg):
        if arg:
            return self.error("no_parameters")
        if self.transaction is None:
            return self.error("need_mail")
        if not self.transaction.queues:
            # RFC 2920 section 3.2 (3): no 354 without a valid recipient.
            return self.error("need_rcpt")
        self.push(reply("data_go"))
        # Set before the 354 leaves: a shutdown that begins once the client
        # has seen it must let this message finish, not cut its input.
        self.in_data = True
        try:
            self.flush()
            self.push(self.receive_data())
        finally:
            self.in_data = False
            self.reset()

    def receive_data(self):
        """Read the message to <CRLF>.<CRLF>, spooling it as it arrives.

        Returns the reply.  Memory use does not depend on the message size:
        lines are read in chunks of at most DATA_CHUNK octets and written
        straight to the tmp/ files.
        """
        transaction, config = self.transaction, self.config
        qid = new_queue_id()
        envelopes = [(name, Envelope(qid, transaction.sender, rcpts, client=self.peer,
                                     helo=self.helo, body=transaction.body))
                     for name, rcpts in transaction.queues.items()]
        try:
            incoming = self.app.spool.receive(envelopes)
            incoming.write(received_line(self.helo, self.peer, config.hostname,
                                         self.protocol(), qid))
        except (OSError, SpoolError) as exc:
            log.error("cannot spool %s: %s", qid, exc)
            incoming = None
        try:
            problem, size = self.read_data(incoming)
            if problem is None and incoming is not None:
                try:
                    incoming.commit()
                except OSError as exc:
                    log.error("cannot commit %s: %s", qid, exc)
                    problem = "storage"
            elif problem is None:
                problem = "storage"
        finally:
            if incoming is not None:
                incoming.abort()        # a no-op after a successful commit
        if problem:
            log.info("[%s] message from <%s> refused: %s", self.peer,
                     transaction.sender, REPLIES[problem])
            return reply(problem)
        self.accepted += 1
        log.info("%s accepted from [%s] <%s> to %s, %d bytes", qid, self.peer,
                 transaction.sender,
                 ", ".join("<%s>" % r for rcpts in transaction.queues.values() for r in rcpts),
                 size)
        return reply("queued", qid=qid)

    def read_data(self, incoming):
        """Copy DATA into `incoming`; return (reply name or None, size).

        Only <CRLF>.<CRLF> ends the data (RFC 5321 section 4.1.1.4).  A line
        after a bare LF is not a line start, so "<LF>.<CRLF>" ends nothing:
        that is what defeats SMTP smuggling.  Any bare CR or LF condemns the
        message, but we still read to the real end so the session stays in
        step.
        """
        limit = self.config.max_message_size
        size = received = 0
        problem = None
        at_line_start = in_headers = True
        while True:
            chunk = self.reader.readline(DATA_CHUNK)
            if not chunk:
                raise ConnectionError("connection closed during DATA")
            if at_line_start:
                if chunk == b".\r\n":
                    return problem, size
                if chunk[:1] == b".":
                    chunk = chunk[1:]               # RFC 5321 section 4.5.2
            if chunk.endswith(b"\r\n"):
                content, at_line_start = chunk[:-2], True
            elif chunk.endswith(b"\n"):
                content, at_line_start = chunk[:-1], False
                problem = problem or "bare_newline_data"
            else:
                content, at_line_start = chunk, False
            if b"\r" in content:
                problem = problem or "bare_newline_data"
            if in_headers and at_line_start:
                if not content:
                    in_headers = False
                elif content[:9].lower() == b"received:":
                    received += 1
                    if received >= MAX_RECEIVED_HEADERS:
                        problem = problem or "loop"
            size += len(chunk)
            if size > limit:
                problem = problem or "too_big"
            if problem is None and incoming is not None:
                try:
                    incoming.write(chunk)
                except OSError as exc:
                    log.error("cannot write %s: %s", incoming.qid, exc)
                    problem = "storage"

    def protocol(self):
        """The "with" word of the Received line (RFC 3848)."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.user else "")

    # -- ETRN (RFC 1985) ----------------------------------------------------------

    def smtp_ETRN(self, arg):
        if self.transaction is not None:
            # RFC 1985 section 5: illegal inside a transaction; RFC 5321 4.1.4: 503.
            return self.error("in_transaction")
        self.etrn_count += 1
        if self.etrn_count > self.config.max_etrn:
            self.close_with("too_many_etrn")
        if not arg:
            return self.error("etrn_missing")
        node = printable(arg, 100)
        option, name = (arg[0], arg[1:]) if arg[0] in "@#" else ("", arg)
        if option == "#":
            if name.lower() != "all":
                return self.push(reply("etrn_refused", node=node,
                                       reason="the only named queue is #all"))
            candidates, explicit = list(self.config.domains.values()), True
        elif option == "@":
            parent = normalize_domain(name, need_dot=False) if name else ""
            if parent is None:
                return self.error("etrn_syntax")
            candidates = [d for d in self.config.domains.values()
                          if not parent or domain_within(d.name, parent)
                          or (d.subdomains and domain_within(parent, d.name))]
            explicit = True
        else:
            domain_name = normalize_domain(name)
            if domain_name is None:
                return self.error("etrn_syntax")
            held = self.config.find_domain(domain_name)
            if held is None:
                return self.push(reply("etrn_refused", node=node, reason="not held here"))
            candidates, explicit = [held], False
        allowed, reason = [], "not held here"
        for domain in candidates:
            ok, reason = self.may_kick(domain, explicit)
            if ok:
                allowed.append(domain)
        if not allowed:
            return self.push(reply("etrn_refused", node=node, reason=reason))
        try:
            count = self.kick(allowed)
        except OSError as exc:
            log.error("ETRN %s from [%s]: %s", node, self.peer, exc)
            return self.push(reply("etrn_unable", node=node))
        log.info("ETRN %s from [%s]: %d message(s) in %s", node, self.peer, count,
                 ", ".join(d.name for d in allowed))
        if count == 0:
            return self.push(reply("etrn_empty", node=node))
        self.push(reply("etrn_started", count=count, node=node))

    def may_kick(self, domain, explicit=False):
        """May this client start a delivery of `domain`?  -> (bool, reason).

        The one place that decides (SPEC "Routes"): an address in etrn_from
        or an authenticated owner always may; anyone may kick a fixed-host
        route with no etrn_from, unless `explicit` authorisation is needed
        (the "@" and "#" forms); hold routes only move by TURN/ATRN.
        """
        if domain.route.kind == "hold":
            return False, "released only by TURN or ATRN"
        if address_in(self.peer, domain.etrn_from) or (self.user and self.user in domain.owners):
            return True, ""
        if domain.route.kind == "host" and not domain.etrn_from and not explicit:
            return True, ""
        return False, "not authorized for this client"

    def kick(self, domains):
        """Schedule deliveries; return how many messages are waiting."""
        total = 0
        for domain in domains:
            count = self.app.spool.count(domain.name)
            if count:
                target = self.peer if domain.route.kind == "client" else None
                self.app.deliverer.kick(domain.name, target)
                total += count
        return total

    def autoturn(self):
        """A connection from a part-time host is itself a kick (serialmail's
        AutoTURN; RFC 5321 section 4.5.4.2 suggests exactly this)."""
        for domain in self.config.domains.values():
            if domain.autoturn and address_in(self.peer, domain.etrn_from):
                with contextlib.suppress(OSError):
                    if self.kick([domain]):
                        log.info("autoturn: [%s] connected, delivering %s", self.peer,
                                 domain.name)

    # -- AUTH (RFC 4954) ----------------------------------------------------------

    def mechanisms(self):
        """SASL mechanisms on offer now: PLAIN and LOGIN only where the
        password cannot be sniffed (TLS, or loopback), RFC 4954 section 4."""
        if not self.config.users:
            return []
        if self.tls or is_loopback(self.peer):
            return ["CRAM-MD5", "PLAIN", "LOGIN"]
        return ["CRAM-MD5"]

    def smtp_AUTH(self, arg):
        if not self.config.users:
            return self.error("not_implemented")
        if self.user is not None:
            return self.error("auth_twice")
        if self.transaction is not None:
            return self.error("in_transaction")
        if self.helo is None:
            return self.error("need_helo")
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self.mechanisms():
            return self.error("auth_mechanism")
        self.flush()
        try:
            method = getattr(self, "auth_" + mechanism.replace("-", "_"))
            user = method(initial.strip())
        except AuthAbort as abort:
            return self.error(abort.args[0])
        if user is None:
            self.auth_failures += 1
            log.warning("[%s] AUTH %s failed", self.peer, mechanism)
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.close_with("auth_too_many")
            return self.push(reply("auth_failed"))
        self.user = user
        log.info("[%s] authenticated as %r with %s", self.peer, user, mechanism)
        self.push(reply("auth_ok"))

    def challenge(self, data):
        """Send a 334 challenge and return the client's decoded answer."""
        self.push(reply("auth_challenge", data=base64.b64encode(data).decode("ascii")))
        line = self.reader.readline(MAX_AUTH_LINE + 2)
        if not line.endswith(b"\n"):
            if not line:
                raise ConnectionError("connection closed during AUTH")
            self.reader.skip_line()
            raise AuthAbort("auth_line_too_long")
        return self.decode(line.rstrip(b"\r\n").decode("ascii", "replace").strip())

    @staticmethod
    def decode(text):
        if text == "*":
            raise AuthAbort("auth_cancelled")       # RFC 4954 section 4
        if text == "=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise AuthAbort("auth_bad_base64") from None

    def check_password(self, name, password):
        """The account name if `password` is right; compared in constant time,
        and the same work is done for an unknown name as for a known one."""
        secret = self.config.users.get(name)
        expected = (secret if secret is not None else secrets.token_hex(16)).encode("utf-8")
        ok = hmac.compare_digest(expected, password)
        return name if ok and secret is not None else None

    def auth_CRAM_MD5(self, initial):
        # RFC 2195; required by RFC 2645 section 5.1.2.  Server speaks first.
        if initial:
            raise AuthAbort("auth_cancelled")
        challenge = ("<%s.%d@%s>" % (secrets.token_hex(8), time.time(),
                                     self.config.hostname)).encode("ascii")
        name, _, digest = self.challenge(challenge).decode("utf-8", "replace").rpartition(" ")
        secret = self.config.users.get(name)
        key = (secret if secret is not None else secrets.token_hex(16)).encode("utf-8")
        expected = hmac.new(key, challenge, hashlib.md5).hexdigest()
        ok = hmac.compare_digest(expected.encode("ascii"), digest.lower().encode("ascii", "replace"))
        return name if ok and secret is not None else None

    def auth_PLAIN(self, initial):
        # RFC 4616: [authzid] NUL authcid NUL passwd.
        message = self.decode(initial) if initial else self.challenge(b"")
        parts = message.split(b"\0")
        if len(parts) != 3 or any(len(p) > 255 for p in parts):
            return None
        authzid, authcid = (part.decode("utf-8", "replace") for part in parts[:2])
        password = parts[2]
        if authzid and authzid != authcid:
            return None
        return self.check_password(authcid, password)

    def auth_LOGIN(self, initial):
        # draft-murchison-sasl-login: "Username:" then "Password:".
        name = self.decode(initial) if initial else self.challenge(b"Username:")
        password = self.challenge(b"Password:")
        return self.check_password(name.decode("utf-8", "replace"), password)

    # -- STARTTLS (RFC 3207) ------------------------------------------------------

    def smtp_STARTTLS(self, arg):
        if arg:
            return self.error("no_parameters")
        if self.tls:
            return self.error("tls_active")
        context = self.config.tls
        if context is None:
            return self.error("not_implemented")
        try:
            # Make sure a TLS session can be set up before promising one with
            # 220 (RFC 3207 section 4: 454 when TLS is not available).
            context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
        except (ssl.SSLError, OSError, MemoryError) as exc:
            log.error("[%s] cannot start TLS: %s", self.peer, exc)
            return self.push(reply("tls_unavailable"))
        self.push(reply("tls_go"))
        self.flush()
        try:
            self.connection = context.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("[%s] TLS handshake failed: %s", self.peer, exc)
            self.closing = True
            raise SessionEnd() from None
        # CVE-2011-0411: the old reader's buffer holds whatever the client
        # pipelined after STARTTLS in the clear.  It goes with the old reader
        # and is never executed inside TLS.
        self.reader = LineReader(self.connection, self.flush)
        # RFC 3207 section 4.2: forget everything learnt before the handshake.
        self.tls, self.helo, self.esmtp, self.user = True, None, False, None
        self.reset()
        log.info("[%s] TLS started: %s", self.peer, self.connection.version())

    # -- TURN (RFC 821) and ATRN (RFC 2645) ------------------------------------

    def smtp_TURN(self, arg):
        if not self.config.turn_enabled:
            return self.error("turn_disabled")
        if arg:
            return self.error("no_parameters")
        if self.user is None:
            return self.error("auth_required")
        if self.transaction is not None:
            return self.error("in_transaction")
        domains = [d.name for d in self.config.domains.values()
                   if d.turn and self.user in d.owners]
        if not domains:
            return self.error("turn_refused")
        with contextlib.ExitStack() as locks:
            held = [name for name in domains
                    if locks.enter_context(self.app.spool.lock(name))]
            if not held:
                # Every domain is being delivered by another run: say so, as
                # ATRN does, rather than turn around for nothing.
                return self.push(reply("turn_busy"))
            for name in sorted(set(domains) - set(held)):
                log.info("TURN: %s is being delivered by another run; skipped", name)
            self.reverse("turn_ok", held)

    def smtp_ATRN(self, arg):
        if not (self.odmr or self.config.smtp_atrn) or not self.config.users:
            return self.error("not_implemented")
        if self.user is None:
            return self.error("auth_required")      # RFC 2645 section 5.2.1
        if self.transaction is not None:
            return self.error("in_transaction")
        owned = [d.name for d in self.config.domains.values() if self.user in d.owners]
        if arg:
            wanted = []
            for name in arg.split(","):
                norm = normalize_domain(name)
                if norm is None:
                    return self.error("atrn_syntax")
                held = self.config.find_domain(norm)
                if held is None or held.name not in owned:
                    # All or nothing: RFC 2645 section 5.2.1.
                    log.warning("ATRN from %r for %s refused: not owned", self.user, norm)
                    return self.push(reply("atrn_refused"))
                if held.name not in wanted:
                    wanted.append(held.name)
        else:
            wanted = owned
        if not wanted:
            return self.push(reply("atrn_refused"))
        with contextlib.ExitStack() as locks:
            for name in wanted:
                if not locks.enter_context(self.app.spool.lock(name)):
                    return self.push(reply("atrn_busy", domain=name))
            try:
                waiting = sum(self.app.spool.count(name) for name in wanted)
            except OSError as exc:
                log.error("ATRN: cannot read the spool: %s", exc)
                return self.push(reply("atrn_unavailable"))
            if not waiting:
                return self.push(reply("atrn_no_mail"))
            self.reverse("atrn_ok", wanted)

    def reverse(self, ok_reply, queues):
        """Say 250, become the client on this connection, deliver, QUIT.

        The caller holds the queues' locks.  If the customer vanishes midway,
        every message not yet accepted stays queued.
        """
        self.push(reply(ok_reply))
        # Like DATA, a reversed session must not have its input cut by
        # shutdown(): the reply to the message in flight would be lost and the
        # message sent twice.  deliver_queue() stops between messages instead.
        self.in_data = True
        self.flush()
        self.closing = True
        log.info("[%s] %r: reversing the connection for %s", self.peer, self.user,
                 ", ".join(queues) or "no domains")
        remote = "customer [%s]" % self.peer
        try:
            smtp = reversed_client(self.connection, self.reader, self.config.hostname,
                                   self.config.timeout)
        except DeliveryError as exc:
            log.warning("[%s] reversal failed: %s", self.peer, exc)
            return
        try:
            for name in queues:
                deferred = self.app.deliverer.deliver_queue(name, lambda: smtp, remote)
                if deferred:
                    self.app.spool.write_state(name, last_error="%d deferred by %s"
                                               % (deferred, remote))
            smtp.quit()
        except DeliveryError as exc:
            log.warning("[%s] reversed delivery stopped: %s", self.peer, exc)
            for name in queues:
                if self.app.spool.count(name):
                    self.app.spool.write_state(name, last_error="%s: %s" % (remote, exc))
        except (OSError, smtplib.SMTPException) as exc:
            log.info("[%s] customer closed after delivery: %s", self.peer, exc)


def _peer_ip(client_address):
    """The client's IP as text; IPv4-mapped IPv6 shown as plain IPv4."""
    if isinstance(client_address, tuple) and client_address:
        ip = str(client_address[0])
    else:
        ip = str(client_address or "")
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip or "unknown"
    if addr.version == 6 and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    return str(addr)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class SMTPServer(socketserver.ThreadingTCPServer):
    """A listener: one thread per session, at most max_connections at once.

    Past the limit a connection gets 421 and is closed at once, rather than
    waiting in the kernel's backlog for a slot that may never come.

    A thread whose session has ended waits up to SPARE_SECONDS for the next
    connection instead of exiting (at most SPARE_THREADS of them wait):
    starting a thread costs a clone, a stack and a handshake with the
    listener, about a fifth of the CPU of a one-message connection.
    """

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128
    SPARE_THREADS = 64
    SPARE_SECONDS = 1.0

    def __init__(self, address, app, odmr=False, reuse_port=False):
        host, port = address
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app, self.odmr, self.reuse_port = app, odmr, reuse_port
        self.spare_lock = threading.Lock()
        self.spare = 0                  # threads waiting on self.handoff
        self.handoff = queue.SimpleQueue()
        self.closed = False
        super().__init__((host, port), SMTPHandler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            # Each listen address is bound on its own, so an IPv6 listener
            # must not also claim the IPv4 port.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.reuse_port:
            # One listening socket per worker process on the same port: the
            # kernel spreads the connections and wakes only the one that gets
            # each (no thundering herd on a shared socket).
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def process_request(self, request, client_address):
        if not self.app.admit():
            log.warning("connection from [%s] refused: max_connections reached",
                        _peer_ip(client_address))
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall((reply("too_busy", host=self.app.config.hostname)
                                 + "\r\n").encode("ascii"))
            self.shutdown_request(request)
            return
        try:
            with self.spare_lock:
                spare = self.spare > 0
                if spare:
                    self.spare -= 1     # that thread is now promised this session
            if spare:
                self.handoff.put((request, client_address))
            else:
                threading.Thread(target=self.session_thread, args=(request, client_address),
                                 daemon=True).start()
        except BaseException:
            self.app.release()
            raise

    def session_thread(self, request, client_address):
        while True:
            self.process_request_thread(request, client_address)
            with self.spare_lock:
                if self.closed or self.spare >= self.SPARE_THREADS:
                    return
                self.spare += 1
            try:
                work = self.handoff.get(timeout=self.SPARE_SECONDS)
            except queue.Empty:
                with self.spare_lock:
                    if self.spare > 0:      # no session was promised to us: end
                        self.spare -= 1
                        return
                work = self.handoff.get()   # one was, and is on its way
            if work is None:
                return
            request, client_address = work

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app.release()

    def server_close(self):
        super().server_close()
        with self.spare_lock:
            self.closed, spare, self.spare = True, self.spare, 0
        for _ in range(spare):
            self.handoff.put(None)     # let waiting threads end

    def handle_error(self, request, client_address):
        log.exception("error serving [%s]", _peer_ip(client_address))


class InetdServer:
    """What SMTPHandler needs of a server, for the one session of --inetd."""

    def __init__(self, app, odmr):
        self.app, self.odmr = app, odmr


class Turnd:
    """The running program: configuration, spool, deliverer, sessions."""

    def __init__(self, config):
        self.config = config
        self.spool = Spool(config.spool)
        self.stopping = threading.Event()
        self.deliverer = Deliverer(self)
        self.sessions = set()
        self.connections = 0
        self.connections_lock = threading.Lock()
        self.servers, self.server_sets = [], []

    def admit(self):
        # With several processes each takes its share of max_connections.
        limit = -(-self.config.max_connections // self.config.processes)
        with self.connections_lock:
            if self.connections >= limit:
                return False
            self.connections += 1
            return True

    def release(self):
        with self.connections_lock:
            self.connections -= 1

    def reload(self, load):
        """SIGHUP: read the configuration and users file again.

        A bad new configuration is refused and the old one stays.  Listen
        addresses, the spool and user are fixed at start.
        """
        try:
            config = load()
        except ConfigError as exc:
            log.error("reload refused, keeping the old configuration: %s", exc)
            return False
        for key in ("listen", "odmr_listen", "spool", "user", "log", "processes"):
            if getattr(config, key) != getattr(self.config, key):
                log.warning("reload: %s changed; it takes effect only on restart", key)
        self.config = config
        log.info("configuration reloaded: %d domain(s), %d user(s)", len(config.domains),
                 len(config.users))
        return True

    def bind(self):
        """Open every listener (before privileges are dropped): one set of
        listening sockets per worker process; self.servers is this one's."""
        count = self.config.processes
        self.server_sets = [[] for _ in range(count)]
        addresses = ([(a, False) for a in self.config.listen]
                     + [(a, True) for a in self.config.odmr_listen])
        try:
            for address, odmr in addresses:
                for servers in self.server_sets:
                    server = SMTPServer(address, self, odmr=odmr, reuse_port=count > 1)
                    servers.append(server)
                    # With port 0, the other workers join the port this one got.
                    address = (address[0], server.server_address[1])
        except OSError as exc:
            for server in sum(self.server_sets, []):
                server.server_close()
            raise ConfigError("cannot listen on %s:%d: %s"
                              % (address[0] or "*", address[1], exc.strerror)) from None
        self.servers = self.server_sets[0]

    def serve(self, load):
        """Run the daemon until SIGTERM or SIGINT; reload on SIGHUP.

        With processes = 1 this process serves.  With more, it forks that
        many workers, each serving the same listening sockets with its own
        threads (one Python process runs one thread at a time, so this is
        how turnd uses several cores), and stays behind as their supervisor.
        """
        # Block the signals before any thread starts: every thread inherits
        # the mask, and only sigwait() takes them.  (With Python handlers the
        # kernel could hand a signal to another thread while the main one
        # slept in a lock, and the handler did not run: SIGHUP and SIGTERM
        # were often ignored.)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT,
                                                  signal.SIGHUP, signal.SIGCHLD})
        removed = self.spool.clean_tmp()
        if removed:
            log.info("removed %d unfinished file(s) from tmp/", removed)
        for server in self.servers:
            log.info("listening on %s%s", _address(server.server_address),
                     " (ODMR)" if server.odmr else "")
        if self.config.processes == 1:
            return self.run_worker(load, 0)
        return self.supervise(load, self.config.processes)

    def run_worker(self, load, index):
        """Serve on listening socket set `index` until SIGTERM or SIGINT,
        reloading on SIGHUP.  Worker 0 also runs the retry timer."""
        for other, servers in enumerate(self.server_sets):
            if other != index:
                for server in servers:
                    server.socket.close()       # the supervisor keeps its copy
        self.servers = self.server_sets[index]
        self.deliverer.start(self.config.delivery_threads, timer=index == 0)
        for server in self.servers:
            threading.Thread(target=server.serve_forever, name="listener", daemon=True).start()
        while True:
            signum = signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
            if signum == signal.SIGHUP:
                self.reload(load)
                continue
            log.info("%s received: shutting down", signal.Signals(signum).name)
            self.shutdown()
            return 0

    def supervise(self, load, count):
        """Fork `count` workers, pass signals on to them, replace any that dies.

        This process starts no threads, so forking again stays safe.  Only
        worker 0 runs the retry timer; the spool's locks keep the workers'
        deliveries apart, as they do for concurrent inetd processes.
        """
        workers, stopping, status, deaths = {}, False, 0, []
        # An inherited SIG_IGN would make the kernel reap the workers itself
        # and never tell us that one died.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

        def spawn(index):
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    status = self.run_worker(load, index)
                except BaseException:
                    log.exception("worker %d failed", index)
                finally:
                    logging.shutdown()
                    os._exit(status)
            workers[pid] = index

        for index in range(count):
            spawn(index)
        log.info("%d worker processes started", count)
        while workers:
            signum = signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                     signal.SIGCHLD})
            if signum == signal.SIGCHLD:
                for pid in list(workers):
                    done, code = os.waitpid(pid, os.WNOHANG)
                    if not done:
                        continue
                    index = workers.pop(pid)
                    if stopping:
                        continue
                    log.error("worker %d (pid %d) ended unexpectedly (status %d); "
                              "starting another", index, pid, code)
                    now = time.monotonic()
                    deaths = [t for t in deaths if now - t < 10.0] + [now]
                    if len(deaths) >= 5:
                        log.error("workers keep dying (5 in 10 s); stopping")
                        stopping, status = True, 1
                        for other in workers:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(other, signal.SIGTERM)
                        continue
                    spawn(index)
                continue
            if signum == signal.SIGHUP:
                log.info("SIGHUP received: the workers reload")
            else:
                log.info("%s received: stopping the workers", signal.Signals(signum).name)
                stopping = True
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)
        for server in sum(self.server_sets, []):
            server.server_close()
        return status

    def shutdown(self):
        """Stop accepting; let sessions in DATA finish; stop between messages."""
        self.stopping.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()
        deadline = time.monotonic() + self.config.timeout
        for session in list(self.sessions):
            if not session.in_data:
                with contextlib.suppress(OSError):
                    session.connection.shutdown(socket.SHUT_RD)
        while self.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        self.deliverer.stop(deadline)
        left = len(self.sessions)
        if left:
            log.warning("%d session(s) still open at exit", left)


def drop_privileges(name):
    """Become `name` (and its groups).  Raises ConfigError if that fails."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError("[turnd] user = %s: no such user" % name) from None
    if os.getuid() == entry.pw_uid:
        return
    try:
        os.setgroups(os.getgrouplist(name, entry.pw_gid))
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise ConfigError("[turnd] user = %s: cannot drop privileges: %s"
                          % (name, exc.strerror)) from None
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise ConfigError("[turnd] user = %s: privileges were not dropped" % name)


def serve_inetd(app, odmr):
    """One session on fd 0, then the deliveries it kicked (inetd mode)."""
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        raise ConfigError("--inetd: standard input is not a socket") from None
    # tcpserver sets TCPREMOTEIP and xinetd REMOTE_HOST; trust them only if
    # they are IP addresses, else ask the socket.
    peer = next((value for value in (os.environ.get("TCPREMOTEIP"), os.environ.get("REMOTE_HOST"))
                 if value and _valid_ip(value)), "")
    if not peer:
        try:
            peer = sock.getpeername()[0] if sock.family in (socket.AF_INET,
                                                            socket.AF_INET6) else ""
        except OSError:
            peer = ""
    app.spool.clean_tmp()
    with sock:
        SMTPHandler(sock, (peer or "unknown", 0), InetdServer(app, odmr))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    app.deliverer.run_pending()
    return 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, "turnd: %s (see --help)\n" % message)


def build_parser():
    parser = ArgumentParser(
        prog="turnd.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__, usage="%(prog)s [options]")
    parser.add_argument("-c", "--config", metavar="FILE")
    parser.add_argument("--listen", action="append", metavar="HOST:PORT")
    parser.add_argument("--spool", metavar="DIR")
    parser.add_argument("--domain", action="append", metavar="NAME[=ROUTE]")
    parser.add_argument("-v", "--verbose", action="store_true")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--inetd", action="store_true")
    mode.add_argument("--queue", action="store_true")
    mode.add_argument("--flush", metavar="DOMAIN")
    mode.add_argument("--run-queue", action="store_true")
    mode.add_argument("--check", action="store_true")
    parser.add_argument("--odmr", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--version", action="version", version="turnd " + __version__)
    return parser


def setup_logging(config, inetd=False):
    """stderr, syslog or a file; in inetd mode stderr may be the socket."""
    target = config.log
    if inetd and target == "stderr":
        target = "syslog"
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        formatter = logging.Formatter("%(asctime)s turnd[%(process)d]: %(message)s")
    elif target == "syslog":
        address = next((p for p in ("/dev/log", "/var/run/syslog") if os.path.exists(p)),
                       ("localhost", logging.handlers.SYSLOG_UDP_PORT))
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        formatter = logging.Formatter("turnd[%(process)d]: %(message)s")
    else:
        try:
            handler = logging.FileHandler(target, encoding="utf-8")
        except OSError as exc:
            raise ConfigError("[turnd] log = %s: %s" % (target, exc.strerror)) from None
        formatter = logging.Formatter("%(asctime)s turnd[%(process)d]: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger("turnd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if config.verbose else logging.INFO)
    root.propagate = False
    # No format above names a source line, function, thread or process name,
    # so skip gathering them for every record (logging HOWTO, "Optimization"):
    # the stack walk alone was about 4% of the CPU while accepting mail.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    if inetd:
        # fd 2 is the client's socket under inetd: a stray traceback must not
        # reach the peer.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


def describe(config):
    """The --check summary: what this configuration would serve."""
    lines = ["configuration %s is valid" % config.source,
             "hostname: %s" % config.hostname,
             "listen: %s" % ", ".join(map(_address, config.listen)),
             "odmr_listen: %s" % (", ".join(map(_address, config.odmr_listen)) or "off"),
             "spool: %s" % config.spool,
             "processes: %d" % config.processes,
             "users: %d%s" % (len(config.users),
                              " (from %s)" % config.users_path if config.users_path else ""),
             "STARTTLS: %s" % ("on" if config.tls else "off"),
             "TURN: %s" % ("on" if config.turn_enabled else "off"),
             "smarthost: %s" % ("%s:%d" % config.smarthost if config.smarthost else "none"),
             "domains:"]
    for domain in sorted(config.domains.values(), key=lambda d: d.name):
        extras = [word for word, on in (("subdomains", domain.subdomains),
                                        ("turn", domain.turn),
                                        ("autoturn", domain.autoturn)) if on]
        networks = domain.etrn_from
        etrn = "any" if networks == ("any",) else ", ".join(map(str, networks)) or "-"
        lines.append("  %s  route %s  etrn_from %s  owners %s%s"
                     % (domain.name, domain.route, etrn,
                        ", ".join(sorted(domain.owners)) or "-",
                        "  " + " ".join(extras) if extras else ""))
    if not config.domains:
        lines.append("  (none: only postmaster mail is accepted)")
    return "\n".join(lines)


def queue_report(config, spool):
    """Per queue: messages, bytes, oldest age, route, last error."""
    now = time.time()
    names = sorted(set(config.domains) | set(spool.queues()))
    report = []
    for name in names:
        count, size, oldest = spool.stats(name)
        state = spool.read_state(name)
        report.append({
            "domain": name, "messages": count, "bytes": size,
            "oldest_age": round(now - oldest) if oldest else None,
            "route": str(config.route_for(name)),
            "last_error": state.get("last_error", "") if count else "",
        })
    return report


def print_queue(config, spool, as_json):
    report = queue_report(config, spool)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print("%-32s %8s %12s %10s  %-22s %s" % ("DOMAIN", "MESSAGES", "BYTES", "OLDEST",
                                             "ROUTE", "LAST ERROR"))
    for row in report:
        age = row["oldest_age"]
        print("%-32s %8d %12d %10s  %-22s %s" % (
            row["domain"], row["messages"], row["bytes"],
            "-" if age is None else _age(age), row["route"], row["last_error"]))
    total = sum(row["messages"] for row in report)
    print("%d message(s) queued" % total)
    return 0


def _age(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def flush(app, name):
    """--flush DOMAIN: deliver now and wait; 0 only if nothing is left."""
    queue_name = name if name == SMARTHOST_QUEUE else normalize_domain(name, need_dot=False)
    if queue_name is None or (queue_name != SMARTHOST_QUEUE
                              and queue_name not in app.config.domains):
        print("turnd: --flush %s: not a held domain" % printable(name), file=sys.stderr)
        return 2
    route = app.config.route_for(queue_name)
    if not route.pushable:
        print("turnd: --flush %s: route is %s; only its own host can release it "
              "(ETRN, TURN or ATRN)" % (queue_name, route), file=sys.stderr)
        return 1
    app.deliverer.deliver(queue_name)
    left = app.spool.count(queue_name)
    if left:
        state = app.spool.read_state(queue_name)
        print("turnd: %d message(s) still queued for %s: %s"
              % (left, queue_name, state.get("last_error", "")), file=sys.stderr)
        return 1
    return 0


def run_queue(app):
    """--run-queue: one pass over every queue (cron, or inetd set-ups)."""
    app.spool.clean_tmp()
    for queue_name in app.spool.queues():
        if app.spool.count(queue_name):
            app.deliverer.deliver(queue_name)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.odmr and not args.inetd:
        print("turnd: --odmr goes with --inetd (see --help)", file=sys.stderr)
        return 2

    def load():
        return load_config(args.config, args.listen, args.spool, args.domain, args.verbose)

    try:
        config = load()
        if args.check:
            print(describe(config))
            return 0
        if args.queue:
            return print_queue(config, Spool(config.spool), args.json)
        setup_logging(config, inetd=args.inetd)
        app = Turnd(config)
        daemon = not (args.flush or args.run_queue or args.inetd)
        if daemon:
            app.bind()          # ports 25 and 366 need root: bind first
        if config.user:
            # Every mode that touches the spool runs as the same user, so a
            # root cron job never leaves files the daemon cannot open.
            drop_privileges(config.user)
        if args.flush:
            return flush(app, args.flush)
        if args.run_queue:
            return run_queue(app)
        if args.inetd:
            return serve_inetd(app, args.odmr)
        return app.serve(load)
    except ConfigError as exc:
        if args.inetd:
            # The client on fd 1 expects SMTP, not our message: RFC 5321
            # section 3.8 says 421 when the service is not available.
            with contextlib.suppress(OSError):
                os.write(1, (reply("unavailable") + "\r\n").encode("ascii"))
        print("turnd: %s" % exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
