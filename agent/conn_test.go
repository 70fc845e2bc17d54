package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/patience"
	"github.com/muster-io/muster/internal/pki"
)

func TestIsRefusal(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"authorization", nats.ErrAuthorization, true},
		{"closed after the TLS handshake (certificate rejected)", fmt.Errorf("%w: connection closed by remote after TLS handshake: %w", nats.ErrTLS, syscall.EPIPE), true},
		{"in-process pipe closed after the handshake", fmt.Errorf("%w: connection closed by remote after TLS handshake: %w", nats.ErrTLS, io.ErrClosedPipe), true},
		{"TLS handshake timed out (busy broker)", fmt.Errorf("%w: %w", nats.ErrTLS, &net.OpError{Op: "write", Net: "pipe", Err: os.ErrDeadlineExceeded}), false},
		{"remote alert", errors.New("remote error: tls: bad certificate"), true},
		{"no broker", nats.ErrNoServers, false},
		{"plain EOF", io.EOF, false},
		{"connection refused", syscall.ECONNREFUSED, false},
		{"timeout", context.DeadlineExceeded, false},
	} {
		if got := isRefusal(tc.err); got != tc.want {
			t.Errorf("%s: isRefusal(%v) = %t, want %t", tc.name, tc.err, got, tc.want)
		}
	}
}

func TestBackoff(t *testing.T) {
	l := link{wait: 100 * time.Millisecond, maxWait: time.Second}
	for round, full := range map[int]time.Duration{
		1: 100 * time.Millisecond, 2: 200 * time.Millisecond, 3: 400 * time.Millisecond,
		4: 800 * time.Millisecond, 5: time.Second, 50: time.Second,
	} {
		seen := map[time.Duration]bool{}
		for range 200 {
			d := l.backoff(round)
			if d < full/2 || d > full {
				t.Fatalf("round %d: backoff %s outside [%s, %s]", round, d, full/2, full)
			}
			seen[d] = true
		}
		if len(seen) < 2 {
			t.Errorf("round %d: no jitter, always %v", round, seen)
		}
	}
	if d := (link{}).backoff(3); d != 0 {
		t.Errorf("zero link backoff = %s", d)
	}
}

func TestProductionLink(t *testing.T) {
	a, err := New(Options{Identity: "n1.example.net", StateDir: t.TempDir(), AliveInterval: 20 * time.Second,
		ReconnectWait: time.Second, ReconnectMaxWait: 8 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defaults := link{shuffle: true, alive: 20 * time.Second, wait: time.Second, maxWait: 8 * time.Second}
	for _, tc := range []struct {
		name string
		cfg  map[string]string
		want link
	}{
		{"no keys: options, shuffled", nil, defaults},
		{"keys override", map[string]string{
			config.KeyRandomizeHosts: "false", config.KeyAliveInterval: "3s",
			config.KeyReconnectWait: "250ms", config.KeyReconnectMaxWait: "5",
		}, link{shuffle: false, alive: 3 * time.Second, wait: 250 * time.Millisecond, maxWait: 5 * time.Second}},
		{"max below wait is raised", map[string]string{config.KeyReconnectWait: "20s", config.KeyReconnectMaxWait: "1s"},
			link{shuffle: true, alive: 20 * time.Second, wait: 20 * time.Second, maxWait: 20 * time.Second}},
		{"bad values ignored", map[string]string{
			config.KeyRandomizeHosts: "sometimes", config.KeyAliveInterval: "1ns",
			config.KeyReconnectWait: "-1s", config.KeyReconnectMaxWait: "forever",
		}, defaults},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := config.FromMap(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if got := a.productionLink(cfg); got != tc.want {
				t.Errorf("productionLink = %+v, want %+v", got, tc.want)
			}
		})
	}
	if got := a.provisioningLink(); got != defaults {
		t.Errorf("provisioningLink = %+v, want %+v", got, defaults)
	}
}

func TestNewRejectsBadFailoverOptions(t *testing.T) {
	for _, o := range []Options{
		{AliveInterval: -time.Second}, {AliveInterval: time.Millisecond}, {AliveInterval: time.Hour},
		{ReconnectMaxWait: -time.Second},
	} {
		o.Identity, o.StateDir = "n1.example.net", t.TempDir()
		if _, err := New(o); err == nil {
			t.Errorf("New(%+v) accepted", o)
		}
	}
}

// TestConnectTimeout: a connection attempt may take three alive intervals,
// within bounds, at first, and every connection of the agent connects
// through its patience, over TCP or in process.
func TestConnectTimeout(t *testing.T) {
	for _, tc := range []struct {
		alive, want, dial time.Duration
	}{
		{30 * time.Millisecond, 2 * time.Second, 2 * time.Second},
		{2 * time.Second, 6 * time.Second, 2 * time.Second},
		{DefaultAliveInterval, 30 * time.Second, DefaultAliveInterval},
		{30 * time.Second, time.Minute, 30 * time.Second},
		{10 * time.Minute, time.Minute, time.Minute},
	} {
		l := link{alive: tc.alive}
		if got := l.connectTimeout(); got != tc.want {
			t.Errorf("alive %s: connect timeout %s, want %s", tc.alive, got, tc.want)
		}
		if got := l.dialTimeout(); got != tc.dial {
			t.Errorf("alive %s: dial timeout %s, want %s", tc.alive, got, tc.dial)
		}
		log, _ := captureLog()
		a := &Agent{log: log}
		for _, inProcess := range []nats.InProcessConnProvider{nil, &server.Server{}} {
			p := patience.New(l.connectTimeout(), l.dialTimeout(), inProcess, log)
			var o nats.Options
			for _, opt := range a.baseOptions(l, p, nil, nil, nil) {
				if err := opt(&o); err != nil {
					t.Fatal(err)
				}
			}
			if o.Timeout != tc.want || p.Timeout() != tc.want {
				t.Errorf("alive %s: nats connect timeout %s, first attempt's %s, want %s", tc.alive, o.Timeout, p.Timeout(), tc.want)
			}
			if o.CustomDialer != p || p.DialTimeout() != tc.dial {
				t.Errorf("alive %s: dialer %T (TCP connect %s), want the patience (%s)", tc.alive, o.CustomDialer, p.DialTimeout(), tc.dial)
			}
			var want nats.InProcessConnProvider
			if inProcess != nil {
				want = p
			}
			if o.InProcessServer != want {
				t.Errorf("alive %s, in-process %t: provider %T", tc.alive, inProcess != nil, o.InProcessServer)
			}
		}
	}
}

// TestProductionTLSSendsNoRoot checks that a certificate file holding the
// node's certificate and its CA (as a helper may return it) is presented
// without the CA.
func TestProductionTLSSendsNoRoot(t *testing.T) {
	dir := t.TempDir()
	authority, err := ca.Init(filepath.Join(dir, "ca"), "Test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	issued, err := authority.Issue("node1.example.net", nil)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, err := authority.WriteIssued(dir, "node", issued) // certificate + CA
	if err != nil {
		t.Fatal(err)
	}
	tc, err := productionTLS(certFile, keyFile, filepath.Join(dir, "ca", ca.CertFile))
	if err != nil {
		t.Fatal(err)
	}
	chain := tc.Certificates[0].Certificate
	leaf, err := pki.ParseCertificates(issued.CertPEM)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 1 || !bytes.Equal(chain[0], leaf[0].Raw) {
		t.Fatalf("presents %d certificates, want the node's alone", len(chain))
	}
}
