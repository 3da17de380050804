"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the API reports, from a malformed body to a full queue, is an `APIError`
carrying its HTTP status; the app turns it (and Starlette's own 404/405) into this shape, so
clients such as the `openai` package raise their usual exception classes.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# What a client reads when the server fails; the exception itself goes to the log only.
INTERNAL_ERROR = "The server had an error while processing your request."


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code=None
) -> dict:
    """The JSON body of an error response.

    >>> error_body("bad", param="n")["error"]
    {'message': 'bad', 'type': 'invalid_request_error', 'param': 'n', 'code': None}
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error response: status, message, OpenAI error type, offending parameter, code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
