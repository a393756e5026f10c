"""The one error shape every answer of the signaling app uses:
``{"error": {"code", "message"}}`` with an HTTP status and a stable, machine-readable code."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

# Codes for errors aiohttp raises itself (unknown route, wrong method, body over the limit).
HTTP_ERROR_CODES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answer: HTTP status, stable machine-readable code, human message."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)
