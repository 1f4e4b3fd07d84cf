"""kmsproxy backend package (kmsproxy-tpm)."""
