"""The TLS 1.2 client (RFC 5246) for servers that lack TLS 1.3.

Only ECDHE key exchange with AEAD suites, extended master secret (RFC 7627)
and secure renegotiation (RFC 5746): `key_schedule12` contains the PRF and key
derivation, `records12` the record protection, `messages12` the wire
messages 1.2 adds, `hello12` the ClientHello and ServerHello checks, and
`client12` the sans-IO state machine. Alerts, buffers and the TLS 1.3
message codecs are shared with the parent package.
"""
