"""Hooks of the kmsproxy-awskms backend."""
