"""kmsproxy backend package (kmsproxy-pkcs11)."""
