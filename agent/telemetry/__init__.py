"""MQTT telemetry: birth and last will, health, update events."""
