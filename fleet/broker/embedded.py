"""The embedded MQTT broker (amqtt), for a fleet run without an external broker.

It runs in its own asyncio loop on a daemon thread. Anonymous clients are allowed:
it is meant for one machine and development; production uses Mosquitto or EMQX with
per-device credentials and ACLs.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import socket
import threading
import warnings
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)
logging.getLogger("transitions").setLevel(logging.WARNING)


class BrokerStartError(RuntimeError):
    """The embedded broker could not listen."""


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerStartError(
                    f"cannot start the embedded MQTT broker: {host}:{port} is already in use; "
                    "choose another port or pass an external broker URL (--mqtt-url)"
                ) from None
            raise BrokerStartError(f"cannot start the embedded MQTT broker on {host}:{port}: {exc}") from None


# True while the broker answers a SUBSCRIBE: the only time a retained message is due
_SUBSCRIBING: contextvars.ContextVar[bool] = contextvars.ContextVar("subscribing", default=False)


def _broker_class() -> type:
    """amqtt's Broker with its retained-message delivery made MQTT's (and Mosquitto's).

    amqtt 0.12 sends, to every client that connects, the retained messages matching any
    filter any client holds (a device subscribed only to its own topics got every retained
    ``/desired``), and again on each later connect. Retained messages are due once, when a
    client subscribes, and only those its new filter matches."""
    from amqtt.broker import Broker

    class FilteredRetainBroker(Broker):  # type: ignore[misc]  # amqtt ships no types
        async def _handle_subscription(self, *args: Any, **kwargs: Any) -> None:
            token = _SUBSCRIBING.set(True)
            try:
                await super()._handle_subscription(*args, **kwargs)
            finally:
                _SUBSCRIBING.reset(token)

        async def _publish_retained_messages_for_subscription(self, subscription: Any, session: Any) -> None:
            if _SUBSCRIBING.get():
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return FilteredRetainBroker


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "sys_interval": 0,
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float = 15.0) -> None:
        if self._thread is not None:
            raise BrokerStartError("the embedded broker is already running")
        _check_port_free(self.host, self.port)
        Broker = _broker_class()

        loop = asyncio.new_event_loop()
        started: Future[None] = Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                with warnings.catch_warnings():  # amqtt 0.12 deprecates sys_interval; 0 keeps $SYS off
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._broker = Broker(self.config(), loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="embedded-mqtt", daemon=True)
        self._thread.start()
        try:
            started.result(timeout)
        except Exception as exc:
            self._thread = None
            raise BrokerStartError(
                f"cannot start the embedded MQTT broker on {self.host}:{self.port}: {exc}"
            ) from None
        log.info("embedded MQTT broker listening on %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._broker is not None:
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                fut.result(timeout)
            except Exception as exc:
                log.warning("embedded broker shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = self._broker = None
        log.info("embedded MQTT broker stopped")
