// Proxy auto-config (PAC) file for kmsproxy.
//
// Browsers call FindProxyForURL for every request. HTTPS requests to the
// hosts in MTLS_HOSTS go through kmsproxy, which presents your client
// certificate; everything else goes direct. Serve this file with
// `kmsproxy serve --pac FILE` and point the system or browser proxy
// settings at the PAC listener, or load it from disk where the browser
// allows that.

// Hosts that require your client certificate. shExpMatch patterns:
// "*" matches any run of characters, "?" one character.
var MTLS_HOSTS = [
  "*.corp.example.com",
  "grafana.example.net"
];

// Try kmsproxy over TLS first, then over plain HTTP on the same port: the
// listener accepts both. There is no DIRECT fallback, because these hosts
// reject connections that carry no client certificate anyway.
var KMSPROXY = "HTTPS localhost:8090; PROXY localhost:8090";

function FindProxyForURL(url, host) {
  // kmsproxy serves only CONNECT tunnels, which carry https:// and wss://
  // requests. A browser sends plain http:// requests to a proxy as
  // "GET http://...", which kmsproxy rejects with 405.
  var isTunneled = url.substring(0, 6) === "https:" || url.substring(0, 4) === "wss:";
  if (!isTunneled) {
    return "DIRECT";
  }
  for (var i = 0; i < MTLS_HOSTS.length; i++) {
    if (shExpMatch(host, MTLS_HOSTS[i])) {
      return KMSPROXY;
    }
  }
  return "DIRECT";
}
