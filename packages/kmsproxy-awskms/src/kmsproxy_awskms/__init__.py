"""kmsproxy backend for asymmetric keys in AWS KMS (`awskms:` URIs).

`KMSSigner` signs TLS handshakes and certificates with a KMS key through
botocore; `open_signer` opens one from a parsed `KeyURI`.
"""

from kmsproxy_awskms.signer import KMSSigner, open_signer

__all__ = ["KMSSigner", "open_signer"]
