"""Key arguments in one-shot commands: opening them with a time limit, and
printing them without their secrets.

`kmsproxy csr` and `kmsproxy init --key` open one key, use it once and exit.
A device that hangs while the key opens would hang the command, so the open
runs in a worker thread that the command abandons after
`KEY_OPEN_TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import anyio

from kmsproxy.identity import KEY_OPEN_TIMEOUT_SECONDS
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import Signer, SignerError
from kmsproxy.uri import KeyURI, URIError, is_secret_attribute, looks_like_uri

# Placeholder that `shown_key` prints after the scheme of a URI that does not
# parse. Such text may contain a secret, so none of it is shown.
UNPARSED_URI_PLACEHOLDER = "(unparsable URI, not shown)"


async def open_signer_within(registry: Registry, key: str) -> Signer:
    """Open `key` through `registry` in a worker thread.

    Raise `SignerError` naming the key when the open takes longer than
    `KEY_OPEN_TIMEOUT_SECONDS`. The worker thread is then abandoned.
    NOTE: a backend call that returns after the timeout leaves its `Signer`
    unclosed. The commands exit right after the error, which releases it.
    """
    timeout = KEY_OPEN_TIMEOUT_SECONDS
    with anyio.move_on_after(timeout):
        return await anyio.to_thread.run_sync(
            registry.open_signer, key, abandon_on_cancel=True
        )
    raise SignerError(
        f"{shown_key(key)}: opening the key timed out after {timeout:g} s; "
        "check that the device or service responds"
    )


def shown_key(key: str) -> str:
    """Return `key` as it may be printed: a URI's secrets become `***`.

    A URI that does not parse is shown as its scheme and a placeholder,
    because its secrets cannot be found and redacted.
    """
    if not looks_like_uri(key):
        return key
    try:
        uri = KeyURI.parse(key)
    except URIError:
        scheme = key.partition(":")[0]
        return f"{scheme}:{UNPARSED_URI_PLACEHOLDER}"
    if any(is_secret_attribute(name) for name in uri.attributes):
        return uri.redacted()
    return key
