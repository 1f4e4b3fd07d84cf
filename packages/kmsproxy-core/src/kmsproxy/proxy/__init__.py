"""The proxy server: listener, CONNECT parsing, tunnels and the PAC port."""

from kmsproxy.proxy.server import Proxy, ProxyAddresses

__all__ = ["Proxy", "ProxyAddresses"]
