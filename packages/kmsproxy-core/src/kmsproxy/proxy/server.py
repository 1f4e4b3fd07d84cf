"""`Proxy`: the embeddable server that ties the listener, tunnels and PAC.

`Proxy(config).serve()` opens the CA and the client identities, binds the
proxy and PAC ports, reports the bound addresses through `task_status`, and
serves until cancelled. Every connection runs in its own task; a failure in
one is logged and never stops the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from kmsproxy import tls
from kmsproxy.ca import LeafMinter, LocalCA, MintError
from kmsproxy.certificates import CertificateError, CertificateSource
from kmsproxy.config import ProxyConfig
from kmsproxy.errors import UserError
from kmsproxy.identity import IdentityStore, close_signers
from kmsproxy.metrics import metrics
from kmsproxy.plugins.registry import Registry
from kmsproxy.proxy.accept import connection_limit, serve_listener
from kmsproxy.proxy.connect import (
    HEAD_TIMEOUT_SECONDS,
    RequestError,
    RequestHead,
    error_response,
    parse_connect,
    text_response,
)
from kmsproxy.proxy.error_leaf import ErrorLeafMinter
from kmsproxy.proxy.listener import (
    ListenAddress,
    bind,
    bound_addresses,
    parse_listen_address,
    read_head,
    receive_first,
    sniff,
    starts_tls_handshake,
)
from kmsproxy.proxy.pac import (
    MAX_CONCURRENT_PAC_READS,
    PAC_SEND_TIMEOUT_SECONDS,
    check_pac_file,
    pac_response,
)
from kmsproxy.proxy.prometheus import ProxyCounts, is_metrics_request, metrics_response
from kmsproxy.proxy.tls_stream import ServerTLSStream
from kmsproxy.proxy.tunnel import TunnelSettings, run_tunnel, send_final_and_linger
from kmsproxy.signer import Signer

logger = logging.getLogger(__name__)

# Minimum seconds between two WARNING lines about the listener's own
# certificate failing to mint (the CA expired while the proxy runs). A
# client that retries would otherwise log one line per connection.
LISTENER_WARNING_INTERVAL_SECONDS = 60.0


class ListenerCertificateError(Exception):
    """The certificate for the proxy's own TLS port could not be minted."""


_CONNECTION_ERRORS = (
    ssl.SSLError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


@dataclass(frozen=True)
class ProxyAddresses:
    """The addresses the proxy and its PAC listener are bound to."""

    proxy: tuple[ListenAddress, ...]
    pac: tuple[ListenAddress, ...] = ()

    @property
    def proxy_url(self) -> str:
        """An `http://` URL for the first proxy address, for clients."""
        return f"http://{self.proxy[0]}"


class Proxy:
    """The kmsproxy server; see `serve`.

    `minter`, `identity_store`, `session_cache` and `addresses` are set once
    `serve` has started, for callers that inspect the running proxy.
    """

    def __init__(self, config: ProxyConfig, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry
        self.minter: LeafMinter | None = None
        self.identity_store: IdentityStore | None = None
        self.session_cache: tls.SessionCache | None = None
        self.addresses: ProxyAddresses | None = None
        self._settings: TunnelSettings | None = None
        self._pac_readers: anyio.CapacityLimiter | None = None
        self._listener_warned_at = -LISTENER_WARNING_INTERVAL_SECONDS

    async def serve(
        self,
        *,
        task_status: anyio.abc.TaskStatus[ProxyAddresses] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; report the bound addresses once listening.

        Raise `UserError`, `CertificateError` or `SignerError` before
        binding anything when the configuration cannot work.
        """
        config = self.config
        # Step 1: everything that can fail on user input, before binding.
        # The checks that open no key come first, so a typo is reported
        # before a hardware key asks for a PIN or a touch.
        if config.pac_file is not None:
            check_pac_file(config.pac_file)
        proxy_address = parse_listen_address(config.listen)
        pac_address = (
            parse_listen_address(config.pac_listen) if config.pac_listen else None
        )
        trust = self._load_trust()
        registry = self.registry or Registry.load(config.plugins)

        # Step 2: open the keys. Every exit from here on, a startup failure
        # included, closes the keys that the proxy opened itself. A `Signer`
        # that the embedding program passed in ready-made stays open.
        async with contextlib.AsyncExitStack() as keys:
            ca = await _open_ca(registry, config, keys)
            self.minter = minter = LeafMinter(ca)
            store = self.identity_store = await IdentityStore.open(
                registry, config.client_keys, config.client_certificates
            )
            keys.push_async_callback(_close_store, store)
            await store.load()
            self.session_cache = tls.SessionCache()
            self._settings = TunnelSettings(
                minter,
                trust,
                config.connect_timeout,
                config.idle_timeout,
                error_minter=ErrorLeafMinter(ca),
                session_cache=self.session_cache,
            )
            store.add_reload_callback(self._clear_sessions)

            # Step 3: bind, then serve until cancelled.
            await self._bind_and_serve(
                ca, store, proxy_address, pac_address, task_status
            )

    async def _bind_and_serve(
        self,
        ca: LocalCA,
        store: IdentityStore,
        proxy_address: ListenAddress,
        pac_address: ListenAddress | None,
        task_status: anyio.abc.TaskStatus[ProxyAddresses],
    ) -> None:
        """Bind the listeners and serve connections until cancelled."""
        assert self._settings is not None
        config = self.config
        async with contextlib.AsyncExitStack() as stack:
            proxy_listener = await bind(proxy_address)
            stack.push_async_callback(proxy_listener.aclose)
            pac_listener = None
            if pac_address is not None:
                pac_listener = await bind(pac_address, option="--pac-listen")
                stack.push_async_callback(pac_listener.aclose)
            addresses = self.addresses = ProxyAddresses(
                tuple(bound_addresses(proxy_listener)),
                tuple(bound_addresses(pac_listener)) if pac_listener else (),
            )
            # One limit for both listeners, because they share the process's
            # descriptors.
            limiter = anyio.CapacityLimiter(connection_limit(config.max_connections))
            self._pac_readers = anyio.CapacityLimiter(MAX_CONCURRENT_PAC_READS)
            _log_start(ca, addresses, int(limiter.total_tokens), config.pac_file)
            self._settings.own_addresses = frozenset(
                (a.host, a.port) for a in (*addresses.proxy, *addresses.pac)
            )

            try:
                async with anyio.create_task_group() as group:
                    watch = functools.partial(
                        store.watch, handle_sighup=config.handle_signals
                    )
                    await group.start(watch)
                    group.start_soon(
                        serve_listener,
                        proxy_listener,
                        lambda client: self._handle_proxy(client, proxy_address.host),
                        limiter,
                    )
                    if pac_listener is not None and pac_address is not None:
                        group.start_soon(
                            serve_listener,
                            pac_listener,
                            lambda client: self._handle_pac(client, pac_address.host),
                            limiter,
                        )
                    task_status.started(addresses)
            finally:
                logger.info("Proxy stopped")

    def _clear_sessions(self) -> None:
        if self.session_cache is not None:
            self.session_cache.clear()
            logger.debug("Cleared TLS sessions after an identity reload")

    def counts(self) -> ProxyCounts:
        """Return the TLS client's and this proxy's counters now."""
        assert self._settings is not None
        return ProxyCounts(
            tls=metrics.snapshot(),
            tunnels=dataclasses.replace(self._settings.counters),
            minted_certificates=(
                self._settings.minter.mint_count
                - self._settings.minter.listener_mint_count
            ),
            minted_listener_certificates=self._settings.minter.listener_mint_count,
            minted_error_certificates=(
                self._settings.error_minter.mint_count
                if self._settings.error_minter is not None
                else 0
            ),
        )

    def _load_trust(self) -> tls.TrustStore | None:
        if self.config.insecure_skip_verify:
            logger.warning(
                "Upstream certificates are NOT verified (--insecure-skip-verify); "
                "any server can impersonate any host through this proxy"
            )
            return None
        try:
            return tls.TrustStore.load(
                self.config.trust, include_system=self.config.include_system_trust
            )
        except CertificateError as error:
            # The error for a bundle starts with its path. Name the option
            # that set it, as the errors for --pac and --listen do.
            text = str(error)
            if any(text.startswith(f"{path}: ") for path in self.config.trust):
                raise CertificateError(f"--trust/--cacert {text}") from None
            raise

    async def _listener_context(self, host: str) -> ssl.SSLContext:
        assert self.minter is not None
        try:
            return await self.minter.context_for_listener(host)
        except MintError as error:
            # The CA certificate expired while the proxy runs: every TLS
            # connection to the listener fails the same way, so say it once
            # per interval, without a traceback.
            now = anyio.current_time()
            if now - self._listener_warned_at >= LISTENER_WARNING_INTERVAL_SECONDS:
                self._listener_warned_at = now
                logger.warning(
                    "Listener certificate not minted, closing TLS connections "
                    "host=%s error=%s",
                    host,
                    error,
                )
            raise ListenerCertificateError(str(error)) from None

    async def _handle_proxy(self, client: anyio.abc.SocketStream, host: str) -> None:
        async with client:
            try:
                await self._serve_proxy_connection(client, host)
            except ListenerCertificateError:
                pass  # Logged, rate-limited, by _listener_context.
            except Exception:
                # A bug in one tunnel must not stop the server.
                logger.exception("Connection failed unexpectedly")

    async def _serve_proxy_connection(
        self, client: anyio.abc.SocketStream, host: str
    ) -> None:
        assert self.identity_store is not None
        assert self._settings is not None
        stream: anyio.abc.ByteStream = client
        in_tls_handshake = False
        try:
            with anyio.fail_after(HEAD_TIMEOUT_SECONDS):
                initial_data = await receive_first(client)
                if initial_data is None:
                    return
                if starts_tls_handshake(initial_data):
                    in_tls_handshake = True
                    context = await self._listener_context(host)
                    stream = await ServerTLSStream.wrap(
                        client, context, initial_data=initial_data
                    )
                    in_tls_handshake = False
                    initial_data = b""
                head = await read_head(stream, initial_data)
            if head is None:
                return
            request = parse_connect(head)
        except RequestError as error:
            logger.info(
                "Request rejected status=%d reason=%s", error.status_code, error
            )
            await send_final_and_linger(stream, error_response(error))
            return
        except TimeoutError:
            if in_tls_handshake:
                # A plaintext 408 inside a TLS handshake would be noise to the
                # client, so the connection is closed without a response.
                logger.info("Client TLS handshake with the proxy timed out")
                return
            logger.info("Request head timed out seconds=%g", HEAD_TIMEOUT_SECONDS)
            message = f"no complete request head within {HEAD_TIMEOUT_SECONDS:g} s"
            await send_final_and_linger(stream, text_response(408, message))
            return
        except _CONNECTION_ERRORS as error:
            if in_tls_handshake and isinstance(error, ssl.SSLError):
                logger.info(
                    "Client TLS handshake with the proxy failed error=%s "
                    "(does the client trust the kmsproxy CA for https:// "
                    "proxy URLs?)",
                    error,
                )
                return
            logger.debug("Client connection failed error=%r", error)
            return
        logger.debug("CONNECT target=%s", request.authority)
        await run_tunnel(
            stream, request, self.identity_store.identities, self._settings
        )

    async def _handle_pac(self, client: anyio.abc.SocketStream, host: str) -> None:
        async with client:
            stream: anyio.abc.ByteStream = client
            try:
                with anyio.fail_after(HEAD_TIMEOUT_SECONDS):
                    sniffed = await sniff(client, lambda: self._listener_context(host))
                    if sniffed is None:
                        return
                    stream, initial_data = sniffed
                    head = await read_head(stream, initial_data)
                if head is None:
                    return
                response = await self._pac_listener_response(client, head)
                logger.debug(
                    "PAC request method=%s target=%s status=%s",
                    head.method,
                    ascii(head.target),
                    response.split(b" ", 2)[1].decode("ascii"),
                )
            except RequestError as error:
                response = error_response(error)
            except (TimeoutError, *_CONNECTION_ERRORS) as error:
                logger.debug("PAC connection failed error=%r", error)
                return
            except ListenerCertificateError:
                return  # Logged, rate-limited, by _listener_context.
            except Exception:
                logger.exception("PAC connection failed unexpectedly")
                return
            with anyio.move_on_after(PAC_SEND_TIMEOUT_SECONDS):
                await send_final_and_linger(stream, response)

    async def _pac_listener_response(
        self, client: anyio.abc.SocketStream, head: RequestHead
    ) -> bytes:
        if head.method not in ("GET", "HEAD") or not is_metrics_request(head):
            return await pac_response(head, self.config.pac_file, self._pac_readers)
        # The counts are for local monitoring, even if the PAC port is
        # reachable from other hosts.
        remote = client.extra(SocketAttribute.remote_address)  # noqa: S610
        host = remote[0] if isinstance(remote, tuple) else ""
        if not _is_loopback(host):
            logger.info("Metrics request rejected remote=%s", host)
            return text_response(404, "metrics are served to loopback clients only")
        return metrics_response(head, self.counts())


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _open_ca(
    registry: Registry, config: ProxyConfig, keys: contextlib.AsyncExitStack
) -> LocalCA:
    """Open the CA key and certificate; push the key's close onto `keys`.

    A ready-made `Signer` in `config.ca_key` belongs to the caller, so only
    a key that the registry opened is closed. The registry's hooks block on
    the device, so they run in a worker thread.
    """
    if isinstance(config.ca_key, Signer):
        signer = config.ca_key
    else:
        signer = await anyio.to_thread.run_sync(
            registry.open_signer, os.fspath(config.ca_key)
        )
        # Bounded in time and shielded from cancellation, like the store's.
        keys.push_async_callback(close_signers, [signer])
    if isinstance(config.ca_certificate, CertificateSource):
        source = config.ca_certificate
    else:
        source = await anyio.to_thread.run_sync(
            registry.open_certificates, os.fspath(config.ca_certificate)
        )
    chain = await source.load()
    try:
        return LocalCA(chain[0], signer)
    except ValueError as error:
        raise UserError(f"{source.uri}: unusable CA certificate: {error}") from None


async def _close_store(store: IdentityStore) -> None:
    """Close the store's keys even while the proxy is being cancelled.

    `IdentityStore.aclose` bounds each key's close in time. The shield lets
    it take the reload lock, which no reload holds once the watch task ends.
    """
    with anyio.CancelScope(shield=True):
        await store.aclose()


def _log_start(
    ca: LocalCA,
    addresses: ProxyAddresses,
    max_connections: int,
    pac_file: os.PathLike[str] | None,
) -> None:
    logger.info(
        "Proxy listening addresses=%s ca=%s ca_not_after=%s max_connections=%d",
        ",".join(str(a) for a in addresses.proxy),
        ca.certificate.subject.rfc4514_string(),
        ca.certificate.not_valid_after_utc.isoformat(),
        max_connections,
    )
    if addresses.pac:
        logger.info(
            "PAC listening addresses=%s file=%s",
            ",".join(str(a) for a in addresses.pac),
            pac_file or "-",
        )
    warn_if_exposed(addresses)


def warn_if_exposed(addresses: ProxyAddresses) -> None:
    """Log a WARNING for each proxy address that is not a loopback address."""
    for address in addresses.proxy:
        if not _is_loopback(address.host):
            logger.warning(
                "Proxy listens on a non-loopback address address=%s: anyone who "
                "can reach it can use the client certificate (listen on "
                "localhost unless every host that can reach it is trusted)",
                address,
            )
