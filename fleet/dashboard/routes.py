"""Routes of the dashboard: the page, the redirect from ``/``, the static files and the
rollout health series."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from litestar import MediaType, Response, get
from litestar.response import Redirect
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

from fleet.dashboard.health import RolloutHealthController

STATIC = Path(__file__).parent / "static"

# The page loads only its own files and talks only to its own origin; nothing inline.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def _page() -> bytes:
    return (STATIC / "index.html").read_bytes()


@get("/dashboard", include_in_schema=False, media_type=MediaType.HTML)
async def dashboard_page() -> Response[bytes]:
    return Response(_page(), media_type=MediaType.HTML, headers=PAGE_HEADERS)


@get("/", include_in_schema=False)
async def root() -> Redirect:
    return Redirect("/dashboard")


static_router = create_static_files_router(
    path="/dashboard/static",
    directories=[STATIC],
    name="dashboard-static",
    include_in_schema=False,
)

DASHBOARD_HANDLERS: list[ControllerRouterHandler] = [
    dashboard_page, root, static_router, RolloutHealthController
]
