"""Realtime sessions: quota and leases, provider keys and their vault, providers."""
