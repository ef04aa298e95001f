"""Refuse oversized request bodies before anything parses them.

Starlette spools a multipart upload to disk before the route runs, so a size check inside a route
comes too late. This ASGI middleware answers 413 from the Content-Length header alone, without
reading the body, and counts the bytes of bodies streamed without a length (chunked), stopping at
the limit.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, error_response


class UploadLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body exceeds {self.max_bytes} bytes", max_bytes=self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(400, "bad_request", "invalid Content-Length header")(
                        scope, receive, send
                    )
                    return
        if declared is not None and declared > self.max_bytes:
            exc = self._too_large()
            await error_response(exc.status_code, exc.code, exc.message, exc.details)(scope, receive, send)
            return

        received = 0
        exceeded = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise self._too_large()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                if exceeded:
                    return  # whatever the app made of the aborted body, the answer is 413 (sent below)
                started = True
            elif message["type"] == "http.response.body" and exceeded and not started:
                return
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except PayloadTooLarge:
            if started:
                raise
        if exceeded and not started:
            exc = self._too_large()
            await error_response(exc.status_code, exc.code, exc.message, exc.details)(scope, receive, send)
