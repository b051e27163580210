"""The edgefleet device agent: verified model updates, local inference, health telemetry."""

__version__ = "0.1.0"
