"""The fleet application, assembled in one place: database, blob store, controller,
ingester, embedded broker, HTTP controllers, guards, rate limits, metrics and error
handlers.

A process runs the roles its settings name (``run_api``, ``run_ingester``,
``run_controller``); every process answers ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from fleet.api.body_limits import BodyLimitMiddleware, FleetRequest
from fleet.api.bundles import BundleController
from fleet.api.certificates import CertificateController
from fleet.api.context import AppContext
from fleet.api.device_admin import DeviceAdminController
from fleet.api.devices import DeviceController
from fleet.api.enrollment_tokens import EnrollmentTokenController
from fleet.api.errors import EXCEPTION_HANDLERS
from fleet.api.health import HealthController, OpsController
from fleet.api.limits import RateLimitMiddleware
from fleet.api.rollouts import RolloutsController
from fleet.api.tokens import TokenController
from fleet.api.trust import TrustController
from fleet.broker.client import MqttPublisher, parse_mqtt_url, target_from_settings
from fleet.broker.embedded import EmbeddedBroker
from fleet.dashboard import DASHBOARD_HANDLERS
from fleet.db.engine import make_engine
from fleet.identity.store import write_current_crl
from fleet.ingest import rollup
from fleet.ingest.budget import Budget
from fleet.ingest.claims import Bounds
from fleet.ingest.ingester import MAX_SESSION_EXPIRY_S, Ingester
from fleet.metrics import RETENTION_DELETED, MetricsMiddleware
from fleet.registry.blobs import BlobStore
from fleet.rollout import health_buckets
from fleet.rollout.controller import RolloutController
from fleet.rollout.leader import ControllerLoop, lock_for
from fleet.settings import Settings

log = logging.getLogger("fleet")

MAX_JSON_BODY = 1 << 20

API_CONTROLLERS = [DeviceController, CertificateController, BundleController, RolloutsController,
                   TokenController, HealthController,
                   TrustController, DeviceAdminController, EnrollmentTokenController]


def broker_url(settings: Settings) -> str:
    """The URL the fleet itself connects to."""
    return settings.mqtt_url or f"mqtt://{settings.embedded_mqtt_host}:{settings.embedded_mqtt_port}"


def create_app(settings: Settings) -> Litestar:
    """Build the fleet app. Background parts (embedded broker when ``mqtt_url`` is None,
    ingester, controller loop) start in the lifespan, each switchable by ``run_*``."""
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url(), create=settings.db_auto_upgrade)
    own_url = broker_url(settings)
    # The broker login and CA file are for an external broker; the embedded one has neither.
    target = target_from_settings(settings, own_url) if settings.mqtt_url else parse_mqtt_url(own_url)
    # The controller publishes desired-state notices; so does an API process of a split
    # fleet (operator actions such as start assign devices there).
    wants_publisher = settings.run_controller or (settings.run_api and settings.mqtt_url is not None)
    # MQTT 5 (each notice with its content-type) on an external broker; amqtt speaks 3.1.1
    publisher = MqttPublisher(target, mqtt5=settings.mqtt_url is not None) if wants_publisher else None
    # Shared subscriptions: a dead ingester's devices go unheard for up to the session expiry
    # (capped like the ingester's) plus a health interval; shorter silent_after_s are refused.
    silence_floor = (
        (float(min(settings.mqtt_session_expiry_s, MAX_SESSION_EXPIRY_S)), settings.device_health_interval_s)
        if settings.shared_subscription() and settings.mqtt_session_expiry_s > 0
        else None
    )
    controller = RolloutController(
        engine, keys_dir=settings.keys_dir, publisher=publisher, interval_s=settings.controller_interval_s,
        silence_floor=silence_floor,
    )

    def retention() -> None:
        deleted = rollup.trim(engine, settings.retention_days, settings.rollup_retention_days)
        deleted["healthbucket"] = health_buckets.trim(engine, settings.retention_days)
        for table, n in deleted.items():
            RETENTION_DELETED.labels(table=table).inc(n)

    loop = (
        ControllerLoop(
            controller.tick,
            lock_for(engine, data_dir),
            interval_s=settings.controller_interval_s,
            periodic=[(settings.retention_interval_s, retention)],
        )
        if settings.run_controller
        else None
    )
    shared_group = settings.mqtt_share_group if settings.shared_subscription() else None
    ctx = AppContext(
        settings=settings,
        engine=engine,
        blobs=BlobStore(data_dir),
        controller=controller,
        mqtt_url=settings.public_mqtt_url or own_url,
        ingester=Ingester(
            engine, target, shared_group=shared_group, session_expiry_s=settings.mqtt_session_expiry_s,
            bounds=Bounds(max_inferences_per_s=settings.ingest_max_inferences_per_s),
            budget=Budget(messages_per_min=settings.ingest_messages_per_min,
                          bytes_per_min=settings.ingest_bytes_per_min,
                          rows_per_min=settings.ingest_rows_per_min),
        ) if settings.run_ingester else None,
        controller_loop=loop,
    )
    broker = (
        EmbeddedBroker(settings.embedded_mqtt_host, settings.embedded_mqtt_port)
        if settings.mqtt_url is None and (settings.run_ingester or settings.run_controller)
        else None
    )

    def startup() -> None:
        if settings.run_api and settings.mqtt_crl_file is not None:
            write_current_crl(settings, engine)  # the broker's crlfile exists and is fresh
        if broker is not None:
            broker.start()
        if ctx.ingester is not None:
            ctx.ingester.start(wait=5.0)
        if publisher is not None:
            publisher.start(timeout=5.0)
        if loop is not None:
            loop.start()

    def shutdown() -> None:
        if loop is not None:
            loop.stop()
        if publisher is not None:
            publisher.stop()
        if ctx.ingester is not None:
            ctx.ingester.stop()
        if broker is not None:
            broker.stop()
        engine.dispose()

    app = Litestar(
        route_handlers=[
            OpsController, *([*API_CONTROLLERS, *DASHBOARD_HANDLERS] if settings.run_api else [])
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        on_startup=[startup],
        on_shutdown=[shutdown],
        openapi_config=OpenAPIConfig(
            title="edgefleet fleet API",
            version="1",
            path="/schema",
            description="Devices, signed bundles and staged rollouts. See docs/architecture.md and "
            "docs/deployment.md. Operators send 'Authorization: Bearer <token>' (scopes read, deploy, "
            "admin); devices send their own credential.",
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="An operator token (scopes read, deploy, admin) or a device credential",
                    )
                }
            ),
            security=[{"bearer": []}],
        ),
        request_max_body_size=MAX_JSON_BODY,
        request_class=FleetRequest,
        debug=False,
        logging_config=None,  # fleet.logs configures every logger (text or JSON); Litestar's would replace it
    )
    app.state.ctx = ctx
    # Outermost first: every request is counted, then rate limited, then its JSON body bounded
    # (size, nesting), then routed.
    # (Litestar's ASGIApp and our middlewares' callables differ only in how they spell scope,
    # receive and send: the ignores are that, not a behaviour)
    app.asgi_handler = MetricsMiddleware(RateLimitMiddleware(  # type: ignore[arg-type]
        BodyLimitMiddleware(app.asgi_handler, settings), settings))  # type: ignore[arg-type]
    return app
