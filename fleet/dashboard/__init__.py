"""The operator dashboard: one page served by the fleet at ``/dashboard`` (``/`` redirects
there), plain HTML, a small vanilla JS file and CSS from ``static/``, no build step, no CDN.

The page itself is public; its data comes from the operator API with a token the browser
keeps in sessionStorage (typed once, or given in the URL fragment ``#token=...``, which never
reaches the server). ``health.py`` adds the one endpoint the page needs beyond the API:
a rollout's health over time.
"""

from fleet.dashboard.routes import DASHBOARD_HANDLERS

__all__ = ["DASHBOARD_HANDLERS"]
