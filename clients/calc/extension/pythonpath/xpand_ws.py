"""A minimal WebSocket client (RFC 6455) over the standard library's socket and ssl.

The Calc extension runs in LibreOffice's Python with nothing but the standard library, so it
carries its own: the opening handshake, masked text frames out, text/continuation frames in,
pings answered with pongs, and the closing handshake. No extensions, no compression.
"""

import base64
import hashlib
import os
import socket
import ssl
import struct
import threading
import urllib.parse

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class Closed(Exception):
    """The connection ended: `code` and `reason` from the peer's close frame (1006: no frame)."""

    def __init__(self, code=1006, reason=""):
        super().__init__(f"WebSocket closed ({code} {reason})".strip())
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    """The server refused the upgrade: `status` and the start of its `body`."""

    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


class WebSocket:
    """One client connection. `recv` is for one reader thread; `send` may be called from any."""

    def __init__(self, sock):
        self.sock = sock
        self.send_lock = threading.Lock()
        self.buffer = b""

    @classmethod
    def connect(cls, url, timeout=10.0, read_timeout=60.0):
        """Opens `url` (ws:// or wss://). Reads time out after `read_timeout` seconds of
        silence (the gateway pings every 20 s, so silence means a dead connection)."""
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        try:
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
            key = base64.b64encode(os.urandom(16)).decode()
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            )
            sock.sendall(request.encode())
            ws = cls(sock)
            head = ws._read_until(b"\r\n\r\n").decode("latin-1")
            lines = head.split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if status != 101:
                length = int(headers.get("content-length", "0") or 0)
                body = ws._read_exact(min(length, 65536)) if length else b""
                raise HandshakeError(status, body.decode("utf-8", "replace"))
            accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
            if headers.get("sec-websocket-accept") != accept:
                raise HandshakeError(status, "bad Sec-WebSocket-Accept")
            sock.settimeout(read_timeout)
            return ws
        except BaseException:
            sock.close()
            raise

    def _read_until(self, marker):
        while marker not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exact(self, n):
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Closed()
        self.buffer += chunk

    def _send_frame(self, opcode, payload):
        header = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack("!H", n)
        else:
            header.append(0x80 | 127)
            header += struct.pack("!Q", n)
        mask = os.urandom(4)
        # XOR with the mask, a machine word at a time (big frames: a whole sheet's rows).
        repeated = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
        with self.send_lock:
            self.sock.sendall(bytes(header) + mask + masked)

    def send(self, text):
        """Sends one text frame."""
        self._send_frame(OP_TEXT, text.encode("utf-8"))

    def recv(self):
        """The next text message. Pings are answered on the way; a close frame (or a dropped
        connection) raises `Closed`."""
        message, message_op = [], None
        while True:
            b0, b1 = self._read_exact(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read_exact(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read_exact(8))
            if b1 & 0x80:  # servers do not mask, but tolerate it
                mask = self._read_exact(4)
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(self._read_exact(n)))
            else:
                data = self._read_exact(n)
            if opcode == OP_PING:
                self._send_frame(OP_PONG, data)
            elif opcode == OP_PONG:
                pass
            elif opcode == OP_CLOSE:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                try:
                    self._send_frame(OP_CLOSE, data[:2])
                except OSError:
                    pass
                self.sock.close()
                raise Closed(code, data[2:].decode("utf-8", "replace"))
            else:
                if opcode != OP_CONT:
                    message_op = opcode
                message.append(data)
                if fin:
                    payload = b"".join(message)
                    message = []
                    if message_op == OP_TEXT:
                        return payload.decode("utf-8")

    def close(self, code=1000, reason="done"):
        """Sends a close frame and closes the socket (without waiting for the answer)."""
        try:
            self._send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120])
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
