"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations


class ApiError(Exception):
  """A request the server refuses; `status` is the HTTP status, the rest goes into the JSON body."""

  def __init__(
      self,
      status: int,
      message: str,
      *,
      type: str = "invalid_request_error",
      param: str | None = None,
      code: str | None = None,
  ):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
  return ApiError(400, message, param=param, code=code)


def too_long(message: str) -> ApiError:
  return ApiError(413, message, param="messages", code="context_length_exceeded")


def overloaded(message: str) -> ApiError:
  return ApiError(503, message, type="server_error", code="overloaded")
