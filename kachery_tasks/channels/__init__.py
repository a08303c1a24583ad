"""Channels: communities of nodes with signed configs and permissions, talking through a transport."""
