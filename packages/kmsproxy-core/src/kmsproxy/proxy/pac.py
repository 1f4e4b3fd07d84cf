"""The PAC listener's responses: the `--pac` file for any GET path but
`/metrics`, which `prometheus.py` serves.

Browsers and OS proxy settings fetch a proxy auto-config file (a JavaScript
`FindProxyForURL` function) from a URL. The file is read again for every
request, so edits take effect without a restart.
"""

from __future__ import annotations

from pathlib import Path

from kmsproxy.proxy.connect import RequestHead, text_response

# The media type browsers expect for PAC files (Netscape's original name).
PAC_MEDIA_TYPE = "application/x-ns-proxy-autoconfig"


def pac_response(head: RequestHead, pac_file: Path | None) -> bytes:
    """Build the response to one request on the PAC listener."""
    if head.method not in ("GET", "HEAD"):
        return text_response(
            405,
            f"method {head.method} is not allowed: this port serves the PAC file "
            "with GET",
            (("Allow", "GET, HEAD"),),
        )
    if pac_file is None:
        return text_response(404, "no PAC file configured (start with --pac FILE)")
    try:
        body = pac_file.read_bytes()
    except OSError as error:
        return text_response(
            404, f"PAC file {pac_file} is not readable: {error.strerror}"
        )
    fields = (
        f"HTTP/1.1 200 OK\r\nContent-Type: {PAC_MEDIA_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-cache\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return fields if head.method == "HEAD" else fields + body
