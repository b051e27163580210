"""Code both the agent and the fleet use: bundle format, signing, telemetry schema."""

__version__ = "0.1.0"
