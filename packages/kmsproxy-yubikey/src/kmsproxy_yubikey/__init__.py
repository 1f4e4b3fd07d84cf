"""kmsproxy backend package (kmsproxy-yubikey)."""
