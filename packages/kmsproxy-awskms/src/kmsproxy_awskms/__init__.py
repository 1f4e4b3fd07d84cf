"""kmsproxy backend package (kmsproxy-awskms)."""
