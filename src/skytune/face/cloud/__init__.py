"""Laptop-side cloud tools: managed jobs and sweeps on SkyPilot, preflight checks, buckets, dvc exp overrides."""
