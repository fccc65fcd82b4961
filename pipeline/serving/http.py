"""waitress, hardened: connections capped in all and per client address, idle ones closed, a request
that does not arrive whole within a deadline cut off, errors answered as JSON. These subclass
waitress internals (HTTPChannel, TcpWSGIServer, ErrorTask), pinned in constraints.txt."""
from __future__ import annotations

import json
import logging
import socket
import time

from flask import Flask
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from pipeline.errors import PipelineError
from pipeline.serving.app import Limits

log = logging.getLogger("captcha-crnn.serve")


class JsonErrorTask(ErrorTask):
    """waitress's own refusals (body too large, bad request line) as JSON, like the app's."""

    def execute(self):
        e = self.request.error
        body = json.dumps({"error": f"{e.reason}: {e.body}"}).encode()
        # an unknown transfer coding is waitress's 501; the client's request is what is wrong: 400
        self.status = "400 Bad Request" if e.code == 501 else f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


LINGER_SECONDS = 2.0


class GuardedChannel(HTTPChannel):
    """A connection that remembers when its request in progress began arriving, refuses an
    oversized upload before the client sends it, and closes by lingering: once the answer is sent
    it stops writing (FIN) and reads and discards what the client still sends, for up to
    LINGER_SECONDS, before it closes. Closing with unread data pending would reset the connection,
    and a client still uploading (a body refused on its announced length) would see "connection
    reset" instead of the 413 that says why."""

    error_task_class = JsonErrorTask
    reading_since: float | None = None
    lingering_since: float | None = None

    def handle_close(self):
        if self.lingering_since is None and self.connected and not self.total_outbufs_len:
            try:
                self.socket.shutdown(socket.SHUT_WR)
                self.lingering_since = time.time()
                return
            except OSError:
                pass
        super().handle_close()

    def readable(self):
        return self.lingering_since is not None or super().readable()

    def writable(self):
        return self.lingering_since is None and super().writable()

    def handle_read(self):
        if self.lingering_since is None:
            return super().handle_read()
        try:
            data = self.socket.recv(65536)
        except OSError:
            data = b""
        if not data or time.time() - self.lingering_since > LINGER_SECONDS:
            super().handle_close()

    def send_continue(self):
        """No `100 Continue` for a request already refused on its headers (an announced body over
        the limit): waitress would send it, then wait for the whole upload before refusing."""
        if self.request is not None and self.request.error is not None:
            return
        super().send_continue()

    def received(self, data):
        if self.request is None and data and self.reading_since is None:
            self.reading_since = time.time()
        result = super().received(data)
        if self.request is None:
            self.reading_since = None
        return result


class GuardedServer(TcpWSGIServer):
    """waitress's server, plus a cap on connections per client address and a deadline for a
    request to arrive whole (a client trickling a byte at a time never counts as idle)."""

    channel_class = GuardedChannel

    def __init__(self, *args, per_client: int, request_timeout: float, **kwargs):
        self.per_client = per_client
        self.request_timeout = request_timeout
        super().__init__(*args, **kwargs)

    def handle_accept(self):
        try:
            accepted = self.accept()
        except OSError:
            return
        if accepted is None:
            return
        conn, addr = accepted
        client = addr[0]
        if sum(1 for ch in self.active_channels.values() if ch.addr[0] == client) >= self.per_client:
            log.warning("refused a connection from %s: %d open already", client, self.per_client)
            conn.close()
            return
        self.channel_class(self, conn, addr, self.adj, map=self._map)

    def maintenance(self, now):
        super().maintenance(now)  # closes connections idle for longer than channel_timeout
        cutoff = now - self.request_timeout
        for channel in list(self.active_channels.values()):
            if channel.reading_since is not None and channel.reading_since < cutoff:
                channel.will_close = True
            if channel.lingering_since is not None and channel.lingering_since < now - LINGER_SECONDS:
                HTTPChannel.handle_close(channel)  # a client that neither sends nor closes


def listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port))
    except OSError as e:
        raise PipelineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def make_server(app: Flask, sock: socket.socket, threads: int, limits: Limits) -> GuardedServer:
    adj = Adjustments(
        sockets=[sock], threads=threads, ident="captcha-crnn",
        connection_limit=limits.max_connections, channel_timeout=limits.idle_timeout, cleanup_interval=1,
        max_request_body_size=limits.max_bytes + 1,  # waitress refuses at >= its value
        inbuf_overflow=limits.max_bytes + 65536,  # bodies stay in memory, never spooled to disk
        max_request_header_size=65536, asyncore_use_poll=True)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    return GuardedServer(app, {}, _sock=sock, dispatcher=dispatcher, adj=adj, bind_socket=False,
                         sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
                         per_client=limits.max_connections_per_client, request_timeout=limits.request_timeout)
