"""A TLS 1.3 client whose private key is used only through a `Signer`."""
