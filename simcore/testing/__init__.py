"""Conformance kit: backends, strategies and assertions to check any Array-API backend."""
