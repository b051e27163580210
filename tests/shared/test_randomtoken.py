"""Generated secrets must survive being passed as a command-line option value."""

from __future__ import annotations

import argparse
import secrets

import pytest

from shared.randomtoken import random_token


def test_tokens_never_begin_with_a_dash_even_when_the_generator_draws_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter(["-starts-with-dash", "-again", "fine_token"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    assert random_token(24) == "fine_token"


def test_many_tokens_parse_as_option_values() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--admin-token")
    for _ in range(2000):
        token = random_token(24)
        assert len(token) == 32
        assert parser.parse_args(["--admin-token", token]).admin_token == token
