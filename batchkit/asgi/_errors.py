"""HTTP errors of the ASGI adapter: each carries its status and a message safe to send."""

from __future__ import annotations

__all__ = ("BadRequest", "HTTPError")


class HTTPError(Exception):
    """An error answered as ``{"error": message}`` with ``status`` (and extra headers)."""

    status = 500

    def __init__(
        self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.model: str | None = None  # the model the request was for, once known
        self.version: str | None = None  # and its version


class BadRequest(HTTPError):
    """The client's request is malformed or does not fit the model's signature (400)."""

    status = 400
