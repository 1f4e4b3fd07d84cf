// Command tlspeer is a TLS 1.3 server on Go's crypto/tls for the kmsproxy
// interop tests, or a TLS 1.2 only server with -max-version=1.2. It requires
// and verifies a client certificate, issues session tickets unless
// -no-tickets is given, and for each connection:
//
//  1. completes the handshake;
//  2. writes one line describing it:
//     "subject=<client DN> group=<CurveID> resumed=<bool> version=<v> suite=<s>";
//  3. echoes every byte it receives until the client's close_notify;
//  4. closes the connection, which sends its own close_notify.
//
// It prints "listening on ADDR" once it accepts connections. It uses only
// the standard library, so building it fetches nothing.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"time"
)

// handshakeTimeout bounds one handshake, so a stalled client cannot keep a
// connection open. Loopback handshakes take milliseconds.
const handshakeTimeout = 30 * time.Second

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "PEM server certificate chain")
	keyFile := flag.String("key", "", "PEM server private key")
	caFile := flag.String("client-ca", "", "PEM CA bundle that client certificates must chain to")
	noTickets := flag.Bool("no-tickets", false, "send no NewSessionTicket")
	maxVersion := flag.String("max-version", "1.3", "highest TLS version to accept: 1.3 (TLS 1.3 only) or 1.2 (TLS 1.2 only)")
	flag.Parse()

	config, err := serverConfig(*certFile, *keyFile, *caFile, *noTickets)
	if err != nil {
		log.Fatal(err)
	}
	switch *maxVersion {
	case "1.3":
	case "1.2":
		config.MinVersion = tls.VersionTLS12
		config.MaxVersion = tls.VersionTLS12
	default:
		log.Fatalf("invalid -max-version %q: use 1.3 or 1.2", *maxVersion)
	}
	listener, err := tls.Listen("tcp", *addr, config)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening on %s\n", listener.Addr())
	os.Stdout.Sync()
	for {
		conn, err := listener.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go serve(conn.(*tls.Conn))
	}
}

func serverConfig(certFile, keyFile, caFile string, noTickets bool) (*tls.Config, error) {
	certificate, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load server key pair: %w", err)
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("read client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("no PEM certificate in %s", caFile)
	}
	return &tls.Config{
		Certificates:           []tls.Certificate{certificate},
		ClientAuth:             tls.RequireAndVerifyClientCert,
		ClientCAs:              pool,
		MinVersion:             tls.VersionTLS13,
		SessionTicketsDisabled: noTickets,
	}, nil
}

func serve(conn *tls.Conn) {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(handshakeTimeout))
	if err := conn.Handshake(); err != nil {
		log.Printf("handshake failed: remote=%s error=%v", conn.RemoteAddr(), err)
		return
	}
	conn.SetDeadline(time.Time{})
	state := conn.ConnectionState()
	subject := ""
	if len(state.PeerCertificates) > 0 {
		subject = state.PeerCertificates[0].Subject.String()
	}
	fmt.Fprintf(conn, "subject=%s group=%s resumed=%t version=%s suite=%s\n",
		subject, state.CurveID, state.DidResume,
		tls.VersionName(state.Version), tls.CipherSuiteName(state.CipherSuite))
	log.Printf("handshake complete: remote=%s subject=%q group=%s resumed=%t",
		conn.RemoteAddr(), subject, state.CurveID, state.DidResume)
	if _, err := io.Copy(conn, conn); err != nil {
		log.Printf("echo failed: remote=%s error=%v", conn.RemoteAddr(), err)
	}
}
