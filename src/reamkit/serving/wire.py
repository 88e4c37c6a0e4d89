"""uvicorn's HTTP protocol (httptools), writing response header names capitalised as llama-server writes them
(``Access-Control-Allow-Origin``, ``Content-Type``) instead of uvicorn's lower case.

HTTP header names are case-insensitive (RFC 9110 section 5.1), but a client that reads the answer's headers
into a plain dict finds only the spelling it looks for: llama.cpp's own server tests look up
``Access-Control-Allow-Origin``, as browser-side code written against llama-server may. uvicorn lowercases
every name on the wire (``httptools_impl.RequestResponseCycle.send``), after the application has had its say,
so the names are restored where the response head is written: each response's transport capitalises the
names in its first write, which is always the status line and headers (a ``100 Continue`` aside).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def capitalised(head: bytes) -> bytes:
    """A response head (status line, header lines, blank line) with each header name capitalised per word:
    ``access-control-allow-origin: *`` -> ``Access-Control-Allow-Origin: *``; values are left alone."""
    status, *lines = head.split(b"\r\n")
    out = [status]
    for line in lines:
        name, sep, value = line.partition(b":")
        out.append(b"-".join(w.capitalize() for w in name.split(b"-")) + sep + value if sep else line)
    return b"\r\n".join(out)


class _HeadCapitalised:
    """One response's transport: its first write (the head) gets capitalised names, the rest pass as they are."""

    def __init__(self, transport):
        self._transport, self._head_written = transport, False

    def write(self, data: bytes) -> None:
        if not self._head_written and not data.startswith(b"HTTP/1.1 100 "):
            self._head_written = True
            data = capitalised(data)
        self._transport.write(data)

    def __getattr__(self, name):
        return getattr(self._transport, name)


class CapitalisedHeaders(HttpToolsProtocol):
    """``uvicorn.Config(http=CapitalisedHeaders)``: httptools, with header names capitalised on the wire."""

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()       # makes the request's cycle; its task runs only after this returns
        if self.cycle is not None and self.cycle is not before:
            self.cycle.transport = _HeadCapitalised(self.cycle.transport)
