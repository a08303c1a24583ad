"""Nodes that provide: the daemon that answers a channel's requests (``kachery node start``)."""
