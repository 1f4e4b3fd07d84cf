"""Hooks of the kmsproxy-yubikey backend."""
