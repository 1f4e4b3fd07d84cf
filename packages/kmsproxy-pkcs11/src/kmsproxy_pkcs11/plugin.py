"""Hooks of the kmsproxy-pkcs11 backend."""
