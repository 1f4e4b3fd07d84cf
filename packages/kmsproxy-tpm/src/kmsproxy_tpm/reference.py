"""The parts of a `tpmkms:` URI: a key file, the TPM to reach, the auth value.

The forms follow step-kms-plugin's `tpmkms:` URIs:

- `tpmkms:name=mykey` names `mykey.pem` in the key directory (see
  `kmsproxy_tpm.storage`);
- `tpmkms:path=/etc/keys/client.pem` names any TSS2 PRIVATE KEY PEM file,
  such as one written by tpm2-openssl or `tpm2_encodeobject`;
- `device=/dev/tpmrm0` or `tcti=swtpm:host=127.0.0.1,port=2321` selects the
  TPM; only one of the two may be given. Without either, the TCTI in
  `$KMSPROXY_TPM_TCTI` applies, else `/dev/tpmrm0`. The variable is the only
  way to choose the TPM for a key file given by bare path;
- `pin-value=SECRET` or `pin-source=FILE` gives the key's auth value. Neither
  appears in a message, a log line or a repr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kmsproxy.secrets import SecretFileError, read_secret_file
from kmsproxy.signer import SignerError
from kmsproxy.uri import KeyURI, URIError, reject_unknown_attributes
from kmsproxy_tpm import storage
from kmsproxy_tpm.device import DEFAULT_RESOURCE_MANAGER

SCHEME = "tpmkms"

# The kernel's resource manager: it swaps objects in and out for each open
# file, so many programs share the TPM. step-kms-plugin uses the same default.
DEFAULT_DEVICE = DEFAULT_RESOURCE_MANAGER

# Environment variable with the TCTI string for keys that name no device=
# or tcti=, such as a TSS2 file given by bare path (`--clientkey key.pem`).
TCTI_VARIABLE = "KMSPROXY_TPM_TCTI"

# Attributes this backend reads; any other attribute is a typo to report.
KNOWN_ATTRIBUTES = frozenset(
    {"name", "path", "device", "tcti", "pin-value", "pin-source"}
)


@dataclass(frozen=True)
class KeyReference:
    """A parsed `tpmkms:` URI: the key file, the TCTI and the auth value."""

    uri: str
    key_path: Path
    tcti: str
    name: str | None = None
    auth: bytes | None = field(default=None, repr=False)

    @property
    def chain_path(self) -> Path:
        """The certificate chain file beside the key."""
        return storage.chain_path_for(self.key_path)


def tcti_for_device(device: str) -> str:
    """Return the tpm2-tss TCTI string that opens a TPM character device."""
    return f"device:{device}"


def default_tcti() -> str:
    """Return the TCTI in `$KMSPROXY_TPM_TCTI`, else the default device's."""
    return os.environ.get(TCTI_VARIABLE) or tcti_for_device(DEFAULT_DEVICE)


def parse_reference(uri: KeyURI) -> KeyReference:
    """Read a `tpmkms:` URI; raise `SignerError` naming it and the fix."""
    try:
        reject_unknown_attributes(uri, KNOWN_ATTRIBUTES)
    except URIError as error:
        raise SignerError(str(error)) from None
    redacted = uri.redacted()
    name = uri.get("name")
    path_text = uri.get("path")
    if name and path_text:
        raise SignerError(
            f"{redacted}: give name= (a key in {storage.key_directory()}) "
            "or path= (a TSS2 PEM file), not both"
        )
    if name:
        try:
            key_path = storage.key_path_for(name)
        except ValueError as error:
            raise SignerError(f"{redacted}: {error}") from None
    elif path_text:
        key_path = Path(path_text).expanduser()
    else:
        raise SignerError(
            f"{redacted}: missing name= or path= (for example tpmkms:name=mykey; "
            "`kmsproxy tpm list` shows the key names)"
        )
    return KeyReference(
        uri=redacted,
        key_path=key_path,
        tcti=_tcti(uri),
        name=name or None,
        auth=_read_auth(uri),
    )


def _tcti(uri: KeyURI) -> str:
    device = uri.get("device")
    tcti = uri.get("tcti")
    if device and tcti:
        raise SignerError(
            f"{uri.redacted()}: give device= or tcti=, not both "
            f"(device={device} is the same as tcti=device:{device})"
        )
    if tcti:
        return tcti
    if device:
        return tcti_for_device(device)
    return default_tcti()


def _read_auth(uri: KeyURI) -> bytes | None:
    """Return the auth value from `pin-value=` or the first line of `pin-source=`."""
    value = uri.get("pin-value")
    source = uri.get("pin-source")
    if value is not None and source is not None:
        raise SignerError(f"{uri.redacted()}: give pin-value= or pin-source=, not both")
    if value is not None:
        return value.encode()
    if source is None:
        return None
    return read_auth_file(Path(source).expanduser(), uri.redacted())


def read_auth_file(path: Path, subject: str) -> bytes:
    """Return the first line of an auth value file, without its line break.

    Raise `SignerError` naming `subject` and the path for a file that is
    missing, not a regular file or too large (see `read_secret_file`).
    """
    try:
        return read_secret_file(path, "the auth value file")
    except SecretFileError as error:
        raise SignerError(f"{subject}: {error}") from None
