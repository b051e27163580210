"""The fleet service: devices, bundles, staged rollouts with health gates, and the operator CLI."""
