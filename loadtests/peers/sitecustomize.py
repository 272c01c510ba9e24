# Why this file exists: the network guard for the peer benchmark. This machine may send traffic
# to loopback only, and Ray in particular reaches out by itself (its usage-stats and cloud
# detection code tried 169.254.169.254 and a DNS server on a first start, and it binds to the
# machine's non-loopback address unless told otherwise). run.sh copies this file into the
# benchmark venv's site-packages, so EVERY Python process of that venv (the orchestrator, the
# clients, Celery's workers, Ray's driver, workers, replicas and agents) loads it at start-up.
#
# It wraps socket.socket.connect / connect_ex / bind / sendto, socket.create_connection,
# socket.getaddrinfo and the gethostby* / getnameinfo helpers, and refuses any address that is
# not loopback (127.0.0.0/8, ::1, ::ffff:127.x) and any name lookup other than `localhost`. A
# refusal is printed loudly to stderr, appended to $PEERS_GUARD_LOG (bench.py fails the run when
# that file is not empty, so a refusal swallowed by library code still fails it) and raised as
# PermissionError before any packet leaves. Processes that are not Python (Ray's raylet and GCS,
# Redis, xpand) are covered by bench.py's `ss` snapshots instead.

import ipaddress
import os
import socket
import sys
import traceback

_LOG = os.environ.get("PEERS_GUARD_LOG")
_NAMES = {"localhost", "localhost."}
_WILDCARDS = {"", "0.0.0.0", "::", "0:0:0:0:0:0:0:0"}
_IP_FAMILIES = {socket.AF_INET, getattr(socket, "AF_INET6", -1)}


def _ip(host):
    """The address `host` spells, or None when it is a name."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return None
    host = host.strip().strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _loopback_ip(ip):
    if ip.is_loopback:
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped is not None and mapped.is_loopback


def _host_ok(host, allow_wildcard=False):
    """Loopback literals and `localhost` pass; with allow_wildcard, so do None/'' and 0.0.0.0/::
    (getaddrinfo for a passive socket; bind() then refuses a wildcard itself)."""
    if host is None:
        return True  # getaddrinfo(None, ...) is loopback, or the wildcard for AI_PASSIVE
    name = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
    if allow_wildcard and name.strip().strip("[]") in _WILDCARDS:
        return True
    ip = _ip(name)
    if ip is not None:
        return _loopback_ip(ip)
    return name.strip().lower() in _NAMES


def _refuse(what):
    where = f"pid {os.getpid()} ({' '.join(sys.argv[:3]) or sys.executable})"
    stack = "".join(traceback.format_stack(limit=24)[:-2])
    message = f"PEERS NETWORK GUARD: REFUSED {what} in {where}"
    banner = "!" * 78
    try:
        sys.stderr.write(f"\n{banner}\n{message}\n{stack}{banner}\n")
        sys.stderr.flush()
    except Exception:
        pass
    if _LOG:
        try:
            with open(_LOG, "a", encoding="utf-8") as log:
                log.write(f"{message}\n{stack}\n")
        except OSError:
            pass
    raise PermissionError(message)


def _check_address(sock, address, verb, allow_wildcard=False):
    if sock.family not in _IP_FAMILIES:
        return  # AF_UNIX, netlink, socketpair: not network traffic
    host = address[0] if isinstance(address, tuple) and address else address
    if not _host_ok(host, allow_wildcard=allow_wildcard):
        _refuse(f"{verb} to {address!r}")


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_bind = socket.socket.bind
_sendto = socket.socket.sendto
_getaddrinfo = socket.getaddrinfo
_create_connection = socket.create_connection
_gethostbyname = socket.gethostbyname
_gethostbyname_ex = socket.gethostbyname_ex
_gethostbyaddr = socket.gethostbyaddr
_getnameinfo = socket.getnameinfo


def connect(self, address):
    _check_address(self, address, "connect")
    return _connect(self, address)


def connect_ex(self, address):
    _check_address(self, address, "connect_ex")
    return _connect_ex(self, address)


def bind(self, address):
    # Binding is not traffic, but a wildcard or outward-facing listener is how a peer would
    # become reachable from outside; port 0 on loopback is what every client does.
    _check_address(self, address, "bind")
    return _bind(self, address)


def sendto(self, data, *args):
    address = args[-1] if args else None
    _check_address(self, address, "sendto")
    return _sendto(self, data, *args)


def getaddrinfo(host, *args, **kwargs):
    if not _host_ok(host, allow_wildcard=True):
        _refuse(f"getaddrinfo({host!r}) (only localhost and loopback literals may be resolved)")
    return _getaddrinfo(host, *args, **kwargs)


def create_connection(address, *args, **kwargs):
    host = address[0] if isinstance(address, tuple) and address else address
    if not _host_ok(host):
        _refuse(f"create_connection to {address!r}")
    return _create_connection(address, *args, **kwargs)


def gethostbyname(host):
    if not _host_ok(host):
        _refuse(f"gethostbyname({host!r})")
    return _gethostbyname(host)


def gethostbyname_ex(host):
    if not _host_ok(host):
        _refuse(f"gethostbyname_ex({host!r})")
    return _gethostbyname_ex(host)


def gethostbyaddr(host):
    if not _host_ok(host):
        _refuse(f"gethostbyaddr({host!r})")
    return _gethostbyaddr(host)


def getnameinfo(sockaddr, flags):
    host = sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else sockaddr
    if not _host_ok(host):
        _refuse(f"getnameinfo({sockaddr!r})")
    return _getnameinfo(sockaddr, flags)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.socket.bind = bind
socket.socket.sendto = sendto
socket.getaddrinfo = getaddrinfo
socket.create_connection = create_connection
socket.gethostbyname = gethostbyname
socket.gethostbyname_ex = gethostbyname_ex
socket.gethostbyaddr = gethostbyaddr
socket.getnameinfo = getnameinfo
socket.PEERS_NETWORK_GUARD = True
