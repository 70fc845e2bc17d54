package broker

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/token"
)

// Connection costs with both ends in this process, as in `muster bench`:
// what one node's provisioning connection and production connection cost
// the machine (client, broker and its authenticator). Each iteration
// connects, round-trips a PING and closes.

func benchBroker(b *testing.B) *Broker {
	b.Helper()
	cfg := DefaultConfig()
	cfg.Listen = "127.0.0.1:0"
	cfg.StoreDir = b.TempDir()
	br, err := New(cfg, testLog())
	if err != nil {
		b.Fatal(err)
	}
	if err := br.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(br.Shutdown)
	return br
}

// nodeTLS is the production TLS configuration of a node named cn, with a
// certificate from the broker's development CA.
func nodeTLS(b *testing.B, br *Broker, cn string) *tls.Config {
	b.Helper()
	authority, err := ca.LoadDir(br.DevPKI().Dir, 0)
	if err != nil {
		b.Fatal(err)
	}
	is, err := authority.Issue(cn, []string{cn})
	if err != nil {
		b.Fatal(err)
	}
	pair, err := tls.X509KeyPair(is.CertPEM, is.KeyPEM)
	if err != nil {
		b.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(br.CAPEM())
	return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{pair}, RootCAs: roots}
}

func benchConnect(b *testing.B, url string, opts ...nats.Option) {
	b.Helper()
	opts = append(opts, nats.NoReconnect(), nats.Timeout(10*time.Second))
	b.ReportAllocs()
	for b.Loop() {
		nc, err := nats.Connect(url, opts...)
		if err != nil {
			b.Fatal(err)
		}
		if err := nc.FlushTimeout(10 * time.Second); err != nil {
			b.Fatal(err)
		}
		nc.Close()
	}
}

// BenchmarkConnectProvisioningInProcess is an unprovisioned node's
// connection in `muster bench --transport inprocess`: no TLS, the broker
// verifies its provisioning token.
func BenchmarkConnectProvisioningInProcess(b *testing.B) {
	br := benchBroker(b)
	seed, err := os.ReadFile(br.DevPKI().TokenIssuerSeed)
	if err != nil {
		b.Fatal(err)
	}
	iss, err := token.NewIssuer(seed)
	if err != nil {
		b.Fatal(err)
	}
	tok, _, err := iss.Create(token.Scope{Identity: "bench.example.net"}, time.Now(), time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	benchConnect(b, "", nats.InProcessServer(br.Server()), nats.Name("bench.example.net"), nats.Token(tok))
}

// BenchmarkConnectProductionInProcess is a node's production connection
// in `muster bench --transport inprocess`: mutual TLS over the in-process
// pipe, X25519 only (as the agent does in-process).
func BenchmarkConnectProductionInProcess(b *testing.B) {
	br := benchBroker(b)
	tc := nodeTLS(b, br, "bench.example.net")
	tc.CurvePreferences = []tls.CurveID{tls.X25519}
	benchConnect(b, "", nats.InProcessServer(br.Server()), nats.Secure(tc))
}

// BenchmarkConnectProductionTCP is the same over TCP loopback with Go's
// default key exchange (X25519 with ML-KEM), as a real node connects.
func BenchmarkConnectProductionTCP(b *testing.B) {
	br := benchBroker(b)
	benchConnect(b, br.ClientURL(), nats.Secure(nodeTLS(b, br, "bench.example.net")))
}
