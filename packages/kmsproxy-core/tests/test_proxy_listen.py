"""Listen address forms, as `--listen` and `--pac-listen` accept them."""

from __future__ import annotations

import pytest

from kmsproxy.errors import UserError
from kmsproxy.proxy.listener import ListenAddress, parse_listen_address


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
