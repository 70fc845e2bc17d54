package agent

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/protocol"
)

// benchSession is an agent in provisioning mode with a state directory
// under dir, and a CA to sign its CSRs.
func benchSession(b *testing.B) (*session, *ca.CA) {
	b.Helper()
	c, err := ca.Init(filepath.Join(b.TempDir(), "ca"), "Bench CA", 0)
	if err != nil {
		b.Fatal(err)
	}
	a, err := New(Options{Identity: "node1.example.net", StateDir: filepath.Join(b.TempDir(), "state")})
	if err != nil {
		b.Fatal(err)
	}
	return &session{a: a, mode: ModeProvisioning}, c
}

// BenchmarkGenCSR is the node's gencsr: key, CSR and public key, held in
// memory until configure.
func BenchmarkGenCSR(b *testing.B) {
	s, _ := benchSession(b)
	b.ReportAllocs()
	for b.Loop() {
		if an := s.genCSR(protocol.GenCSRRequest{}, s.a.log); an.code != protocol.CodeOK {
			b.Fatalf("gencsr: %s %s", an.code, an.msg)
		}
	}
}

// BenchmarkConfigure is the node's configure with a certificate: chain
// verification, then key, CSR, certificate, CA and configuration written
// as one durable batch (temporary files, fdatasync, renames, one sync per
// directory) in b.TempDir() (set TMPDIR to measure another filesystem).
func BenchmarkConfigure(b *testing.B) {
	s, c := benchSession(b)
	if err := os.MkdirAll(s.a.sslDir, 0o700); err != nil {
		b.Fatal(err)
	}
	gen := s.genCSR(protocol.GenCSRRequest{}, s.a.log)
	if gen.code != protocol.CodeOK {
		b.Fatalf("gencsr: %s", gen.msg)
	}
	csr := gen.body.(protocol.GenCSRReply).CSR
	cert, err := c.SignCSR([]byte(csr), nil)
	if err != nil {
		b.Fatal(err)
	}
	pending := s.a.pending
	req := protocol.ConfigureRequest{
		Configuration: map[string]string{config.KeyMiddlewareHosts: "localhost:4222"},
		Certificate:   string(cert),
		CA:            string(c.CertificatePEM()),
	}
	b.ReportAllocs()
	for b.Loop() {
		s.a.pending = pending // as after gencsr: the key is written too
		if an := s.configure(req, time.Now(), s.a.log); an.code != protocol.CodeOK {
			b.Fatalf("configure: %s %s", an.code, an.msg)
		}
	}
}

// BenchmarkDecideProduction is the mode decision at a restart after
// configure: the files just written, known verified.
func BenchmarkDecideProduction(b *testing.B) {
	for _, known := range []bool{true, false} {
		name := "known"
		if !known {
			name = "verify"
		}
		b.Run(name, func(b *testing.B) {
			s, c := benchSession(b)
			if err := os.MkdirAll(s.a.sslDir, 0o700); err != nil {
				b.Fatal(err)
			}
			gen := s.genCSR(protocol.GenCSRRequest{}, s.a.log)
			cert, err := c.SignCSR([]byte(gen.body.(protocol.GenCSRReply).CSR), nil)
			if err != nil {
				b.Fatal(err)
			}
			an := s.configure(protocol.ConfigureRequest{
				Configuration: map[string]string{config.KeyMiddlewareHosts: "localhost:4222"},
				Certificate:   string(cert), CA: string(c.CertificatePEM()),
			}, time.Now(), s.a.log)
			if an.code != protocol.CodeOK {
				b.Fatalf("configure: %s", an.msg)
			}
			rec := s.a.verified
			if !known {
				rec = nil
			}
			b.ReportAllocs()
			for b.Loop() {
				if d := decideMode(s.a.id, s.a.configFile, true, time.Now(), rec); d.Mode != ModeProduction {
					b.Fatalf("mode %s: %s", d.Mode, d.Reason)
				}
			}
		})
	}
}
