"""The local API's refusal: answered ``status`` with JSON ``{"error": code, "detail": detail}``."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
