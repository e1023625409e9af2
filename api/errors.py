"""One error shape for every failure: ``{"error": {"code", "message", "details"}}``.

Domain errors map to HTTP statuses by class; request validation, unknown routes, oversize
bodies and auth failures use the same shape, and an unexpected exception becomes a 500 that
names nothing internal (the traceback goes to the log only).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.error_shapes import DOMAIN_STATUS, domain_error_body, domain_status, error_body
from domain.errors import DomainError
from service.db_errors import describe, unavailable_errors

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP failure raised by the API layer itself (auth, bad header, bad cursor...)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _clean_validation_errors(errors: Any) -> list[dict[str, Any]]:
    """Field errors without ``input``/``ctx``: they may echo huge or non-JSON values."""
    cleaned = []
    for err in errors:
        cleaned.append(
            {
                "loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return cleaned


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}


async def _domain_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return JSONResponse(domain_error_body(exc), status_code=domain_status(exc))


async def _api_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _clean_validation_errors(exc.errors())
    if any(err["type"] == "json_invalid" for err in errors):
        return error_response(422, "malformed_json", "the request body is not valid JSON", errors)
    where = ", ".join(".".join(str(p) for p in err["loc"]) for err in errors[:5])
    return error_response(422, "validation_error", f"invalid request: {where}", errors)


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 400:
        # FastAPI raises a bare 400 when a body cannot be parsed at all (e.g. JSON nested
        # deeper than the parser allows): that is malformed input, like invalid JSON.
        return error_response(422, "malformed_json", "the request body could not be parsed")
    code = _STATUS_CODES.get(status, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(status, code, message, headers=getattr(exc, "headers", None))


async def _database_handler(request: Request, exc: Exception) -> JSONResponse:
    # The database refused or could not take the work now (unreachable, or on SQLite every
    # writer slot busy past the pool's timeout): nothing was committed (a claimed
    # idempotency key was released), so the same request may simply be sent again.
    # One line with the cause: during an outage every request fails the same way, and a
    # traceback each would bury the log.
    logger.warning(
        "database unavailable on %s %s: %s", request.method, request.url.path, describe(exc)
    )
    response = error_response(
        503, "database_unavailable", "the database is unavailable or busy; retry shortly"
    )
    response.headers["Retry-After"] = "1"
    return response


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_handler)
    app.add_exception_handler(ApiError, _api_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    for database_error in unavailable_errors():
        app.add_exception_handler(database_error, _database_handler)
    app.add_exception_handler(Exception, _unexpected_handler)


__all__ = [
    "DOMAIN_STATUS",
    "ApiError",
    "domain_error_body",
    "domain_status",
    "error_body",
    "error_response",
    "install_error_handlers",
]
