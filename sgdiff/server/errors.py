"""Every error a client sees has OpenAI's shape, {"error": {"message", "type", "param", "code"}},
with the offending field as `param`; nothing else (no traceback) ever leaves the server."""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sgdiff.errors import UserError

log = logging.getLogger("sgdiff.server")

TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """A request the server refuses: `status` 4xx, a message that says what to do, and the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def of(cls, error: UserError, rename: dict[str, str] | None = None) -> ApiError:
        """A library error as a 400 naming the request's field (`rename`: library -> API names)."""
        rename = rename or {}
        param = rename.get(error.field, error.field) if error.field else None
        return cls(400, error.render(lambda name: f"`{rename.get(name, name)}`"), param, "invalid_value")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    body = error_body(error.status, error.message, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def validation_param(location: tuple) -> str | None:
    """("body", "n") -> "n"; a body that is not an object has no field to name."""
    names = [str(part) for part in location if part not in ("body", "query", "path", "form", "header")]
    return ".".join(names) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:
        return error_response(ApiError.of(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = error.errors()[0] if error.errors() else {"loc": (), "msg": "the request is malformed"}
        param = validation_param(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid value")
        text = f"`{param}`: {message}" if param else message
        return error_response(ApiError(400, text, param, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else "the request was refused"
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(ApiError(error.status_code, message, None, None, getattr(error, "headers", None)))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        log.error("request %s %s failed: %s", request.method, request.url.path, error)
        if os.environ.get("SGDIFF_DEBUG", "") not in ("", "0"):
            traceback.print_exception(error)
        return error_response(ApiError(500, "the server failed on this request; its log says why", None, "internal"))
