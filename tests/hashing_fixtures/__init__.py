"""Helpers for the hashing tests (module loading, sample types)."""
