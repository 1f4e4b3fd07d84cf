"""Listen address forms, as `--listen` and `--pac-listen` accept them."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from kmsproxy.errors import UserError
from kmsproxy.proxy.listener import ListenAddress, bind, parse_listen_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:8090", ListenAddress("localhost", 8090)),
        ("tcp:127.0.0.1:8090", ListenAddress("127.0.0.1", 8090)),
        ("[::1]:8091", ListenAddress("::1", 8091)),
        ("tcp:[::1]:0", ListenAddress("::1", 0)),
        (":8090", ListenAddress("localhost", 8090)),
    ],
)
def test_listen_forms(text: str, expected: ListenAddress) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    "text", ["localhost", "::1:8090", "[::1]8090", "[nope]:1", "a:65536", "a:-1"]
)
def test_bad_listen_is_user_error(text: str) -> None:
    with pytest.raises(UserError, match="listen address"):
        parse_listen_address(text)


def test_ipv6_shown_in_brackets() -> None:
    assert str(ListenAddress("::1", 8090)) == "[::1]:8090"


@pytest.mark.parametrize("text", ["8090", "tcp:8090"])
def test_bare_port_hint(text: str) -> None:
    with pytest.raises(UserError, match="missing host; use localhost:8090"):
        parse_listen_address(text)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("option", ["--listen", "--pac-listen"])
@pytest.mark.anyio
async def test_port_in_use_hint(host: str, option: str) -> None:
    with anyio.fail_after(10):
        async with await anyio.create_tcp_listener(
            local_host="127.0.0.1", local_port=0
        ) as taken:
            # anyio's typed attribute lookup (ruff mistakes it for Django's).
            port = taken.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
            with pytest.raises(UserError) as raised:
                await bind(ListenAddress(host, port), option)
    message = str(raised.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:{port}: ")
    assert "already in use" in message
    assert message.endswith(f"choose another port with {option}")
    assert "\n" not in message
