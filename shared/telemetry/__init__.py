"""The MQTT topic layout and message schemas between agents and the fleet (v1)."""
