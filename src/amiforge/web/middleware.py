"""Two pure ASGI layers around the app: a cap on request bodies (checked before anything parses one, so a request
without a token cannot make the server read a large body), and HEAD answered as GET without the body (RFC 9110),
for every page and route that answers GET."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Every body the API and the forms take is a few hundred bytes (a channel, a reason, a strategy).
MAX_BODY = 64 * 1024


class TooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"the request body is larger than {MAX_BODY // 1024} KiB")


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _refuse(send, self.limit)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a body sent without a length (chunked) that grows past the cap
                    raise TooLarge()
            return message

        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except Exception as e:  # TooLarge itself, or what a body parser made of it
            if not _caused_by_too_large(e) or started:
                raise
            await _refuse(send, self.limit)


def _caused_by_too_large(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, TooLarge):
            return True
        if isinstance(error, BaseExceptionGroup):
            return any(_caused_by_too_large(e) for e in error.exceptions)
        error = error.__cause__ or error.__context__
    return False


async def _refuse(send: Send, limit: int) -> None:
    body = (b'{"error":"too_large","message":"the request body is larger than %d KiB","fix":"send less"}'
            % (limit // 1024))  # fmt: skip
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)
