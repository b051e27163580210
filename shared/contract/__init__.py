"""The fleet-agent contract: every message either side sends, as one type both import.

MQTT payloads live in ``shared.telemetry.messages`` (topics in ``shared.telemetry.topics``);
the HTTP documents are here: the desired state (``desired``) and the enrollment and
credential answers (``enrollment``). Each module imports only msgspec (the agent loads it
anyway), so the agent's start path stays lean. ``asyncapi`` renders the MQTT contract as
AsyncAPI with JSON Schema (docs/asyncapi.json).
"""
