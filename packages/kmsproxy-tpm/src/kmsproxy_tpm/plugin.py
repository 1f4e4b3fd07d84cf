"""Hooks of the kmsproxy-tpm backend."""
