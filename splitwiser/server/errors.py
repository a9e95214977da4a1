"""Errors as OpenAI (and vLLM) send them: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

# the ``type`` of each status, as the openai SDK names its exceptions
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answer; raised anywhere in a handler, rendered by the app's handler."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict:
        return error_body(int(self.status), self.message, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=int(self.status))


class BadRequest(APIError):
    status = HTTPStatus.BAD_REQUEST


class Unauthorized(APIError):
    status = HTTPStatus.UNAUTHORIZED


class NotFound(APIError):
    status = HTTPStatus.NOT_FOUND


class TooLarge(APIError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class Unavailable(APIError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
