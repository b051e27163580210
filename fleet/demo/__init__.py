"""The narrated demo: a real fleet, real agents, a staged rollout that rolls back."""
