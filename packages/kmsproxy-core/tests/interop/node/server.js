// A TLS 1.3 (or TLS 1.2) server on Node.js's tls module for the kmsproxy interop tests.
//
// Usage: node server.js PORT CERT KEY CLIENT_CA [VERSION]
//
// VERSION is the only protocol version the server accepts, "TLSv1.3" (the
// default) or "TLSv1.2".
// It listens on 127.0.0.1:PORT, requires a client certificate issued by
// CLIENT_CA (requestCert with rejectUnauthorized), and for each connection:
//   1. writes one line describing the handshake:
//      "subject=<client CN> group=<key exchange group> version=<v> suite=<s>";
//   2. echoes every byte it receives until the client's close_notify;
//   3. ends its side, which sends its own close_notify.
// It prints "listening on HOST:PORT" once it accepts connections.
"use strict";

const fs = require("node:fs");
const tls = require("node:tls");

const HOST = "127.0.0.1";

const VERSIONS = ["TLSv1.3", "TLSv1.2"];

const [port, certFile, keyFile, caFile, version = "TLSv1.3"] =
  process.argv.slice(2);
if (caFile === undefined) {
  console.error("usage: node server.js PORT CERT KEY CLIENT_CA [VERSION]");
  process.exit(2);
}
if (!VERSIONS.includes(version)) {
  console.error(`invalid VERSION ${version}: use TLSv1.3 or TLSv1.2`);
  process.exit(2);
}

const server = tls.createServer(
  {
    cert: fs.readFileSync(certFile),
    key: fs.readFileSync(keyFile),
    ca: fs.readFileSync(caFile),
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: version,
    maxVersion: version,
  },
  (socket) => {
    const subject = socket.getPeerCertificate().subject || {};
    // Node documents that getEphemeralKeyInfo() returns an empty object on a
    // server socket, so the group is "unknown" unless a release fills it in.
    const keyInfo = socket.getEphemeralKeyInfo() || {};
    const group = keyInfo.name || "unknown";
    const cipher = socket.getCipher();
    socket.write(
      `subject=CN=${subject.CN} group=${group} ` +
        `version=${socket.getProtocol()} suite=${cipher.standardName}\n`,
    );
    console.log(`handshake complete: subject=CN=${subject.CN} group=${group}`);
    socket.pipe(socket);
    socket.on("error", (error) => {
      console.log(`connection failed: error=${error.message}`);
    });
  },
);

server.on("tlsClientError", (error) => {
  console.log(`handshake failed: error=${error.message}`);
});

server.listen(Number(port), HOST, () => {
  console.log(`listening on ${HOST}:${port}`);
});
