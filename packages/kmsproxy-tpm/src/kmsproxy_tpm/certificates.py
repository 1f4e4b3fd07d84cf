"""The certificate chain stored beside a TPM key, watched like any file.

`tpmkms:name=mykey` as `--clientcert` reads `mykey.crt` next to `mykey.pem`
(`kmsproxy tpm import-cert` writes it; a renewal tool may replace it). For
`tpmkms:path=/dir/client.pem` the chain is `/dir/client.crt`.
"""

from __future__ import annotations

from cryptography import x509

from kmsproxy.certificates import CertificateError
from kmsproxy.plugins.file import FileCertificateSource
from kmsproxy_tpm.reference import KeyReference


class TPMChainSource(FileCertificateSource):
    """The chain file beside a TPM key, named by the key's URI in errors."""

    def __init__(self, reference: KeyReference) -> None:
        super().__init__(reference.chain_path)
        self._reference = reference

    @property
    def uri(self) -> str:
        return self._reference.uri

    async def load(self) -> list[x509.Certificate]:
        if not self.path.exists():
            name = self._reference.name or "NAME"
            raise CertificateError(
                f"{self.uri}: no certificate chain at {self.path}; store one "
                f"with `kmsproxy tpm import-cert {name} CHAIN.pem`, or give "
                "--clientcert as a file"
            )
        try:
            return await super().load()
        except CertificateError as error:
            raise CertificateError(f"{self.uri}: {error}") from None
