"""The [update] keys of chunked downloads: rate limit, parallelism, metered link and window."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.update.fetch import DownloadPolicy
from agent.update.window import UpdateWindow


def test_defaults_keep_downloads_unlimited_and_unmetered(make_config: Callable[..., AgentConfig]) -> None:
    u = make_config().update
    assert (u.download_parallel, u.download_rate_limit_bps, u.metered, u.window) == (4, 0.0, False, "")
    policy = DownloadPolicy.from_config(u)
    assert policy.window is None and policy.rate_limit_bps == 0 and policy.parallel == 4


def test_metered_window_and_rate_limit_reach_the_policy(make_config: Callable[..., AgentConfig]) -> None:
    u = make_config(update={"metered": True, "window": "22:30-04:00", "download_rate_limit_bps": 250_000,
                            "download_parallel": 2}).update
    policy = DownloadPolicy.from_config(u)
    assert policy.rate_limit_bps == 250_000 and policy.parallel == 2
    assert policy.window == UpdateWindow.parse("22:30-04:00")


@pytest.mark.parametrize(
    ("update", "fragment"),
    [
        ({"metered": True}, "update.metered = true needs update.window"),
        ({"window": "02:00-05:00"}, "applies to metered links only; set metered = true"),
        ({"metered": True, "window": "2:00-5:00"}, "must be HH:MM-HH:MM in local time"),
        ({"metered": True, "window": "02:00-24:00"}, "must be HH:MM-HH:MM"),
        ({"metered": True, "window": "03:00-03:00"}, "empty window"),
        ({"metered": "yes", "window": "02:00-05:00"}, "update.metered = 'yes' must be a bool"),
        ({"download_parallel": 0}, "update.download_parallel = 0 must be > 0"),
        ({"download_parallel": 17}, "must be 1 to 16"),
        ({"download_rate_limit_bps": -1}, "update.download_rate_limit_bps = -1.0 must be >= 0"),
    ],
)
def test_bad_values_are_refused_naming_the_key(
    make_config: Callable[..., AgentConfig], update: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(update=update)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("window", "inside", "outside"),
    [
        ("02:00-05:00", ["02:00", "04:59"], ["01:59", "05:00", "14:00"]),
        ("22:00-04:00", ["22:00", "23:59", "00:00", "03:59"], ["04:00", "21:59", "12:00"]),
    ],
)
def test_window_contains_start_not_end_and_wraps_midnight(
    window: str, inside: list[str], outside: list[str]
) -> None:
    w = UpdateWindow.parse(window)

    def at(hm: str) -> datetime:
        return datetime(2025, 1, 1, int(hm[:2]), int(hm[3:]))

    assert all(w.waiting_reason(at(t)) is None for t in inside)
    assert all(w.waiting_reason(at(t)) is not None for t in outside)
