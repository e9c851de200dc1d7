"""The one error shape of the HTTP API, `{"error": {"code", "message", "fields"}}`, for routes and middleware alike."""

from typing import Any

from fastapi.responses import JSONResponse

from deployments.protocol import ErrorBody


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, fields: list[dict] | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.fields, self.headers = status, code, message, fields or [], headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.fields, self.headers)


def error_response(status: int, code: str, message: str, fields: list[dict] | None = None, headers: dict | None = None):
    body = ErrorBody(code=code, message=message, fields=fields or [])
    return JSONResponse(status_code=status, content={"error": body.model_dump()}, headers=headers)


def field_error(status: int, code: str, field: str, message: str, value: Any = None, headers: dict | None = None) -> ApiError:
    """A rejection naming one field (`body` for the body as a whole), in the message and in `fields`."""
    text = f"{field}: {message}"
    return ApiError(status, code, text, [{"field": field, "value": value, "message": text}], headers)
