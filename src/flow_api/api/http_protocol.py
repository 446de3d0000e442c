"""uvicorn's HTTP/1.1 protocol (httptools) with its own error answer in our JSON shape.

A request line or headers that httptools cannot parse never reaches the app: uvicorn answers
400 itself, in plain text (`send_400_response`). This subclass answers the same 400 as every
other error, `{"error": {"code", "message"}}` with the API's security headers, and still closes
the connection (the rest of the stream cannot be trusted to be HTTP). uvicorn documents `http=`
as taking a protocol class; the one method replaced keeps uvicorn's signature and behaviour.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flow_api.api.security import API_HEADERS
from flow_api.models import ErrorBody, ErrorPayload

MALFORMED_REQUEST = ErrorBody(
    error=ErrorPayload(
        code="malformed_request",
        message="the request line or headers are not valid HTTP/1.1",
    )
)


class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose unparseable-request 400 is JSON."""

    def send_400_response(self, msg: str) -> None:
        body = MALFORMED_REQUEST.model_dump_json(exclude_none=True).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        headers = [
            *self.server_state.default_headers,
            *((name.lower().encode(), value.encode()) for name, value in API_HEADERS.items()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        self.transport.write(b"".join(head) + b"\r\n" + body)
        self.transport.close()
