package broker

import (
	"net"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// exampleIssuer is a valid token issuer public key (the one in the
// example configurations).
const exampleIssuer = "ADOXYGJFGADGY6TI2VIK4GVKX4X7NP754A77FT2EYB4XPL62XCX7ZFTR"

// TestTokenAdmission checks that an unprovisioned node is admitted only
// with a valid token from a trusted issuer whose scope covers the identity
// it connects as.
func TestTokenAdmission(t *testing.T) {
	b := startBroker(t)
	seed, err := os.ReadFile(b.DevPKI().TokenIssuerSeed)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := token.NewIssuer(seed)
	if err != nil {
		t.Fatal(err)
	}
	otherSeed, _, err := token.GenerateIssuerSeed()
	if err != nil {
		t.Fatal(err)
	}
	other, err := token.NewIssuer(otherSeed)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(iss *token.Issuer, s token.Scope, at time.Time, ttl time.Duration) string {
		tok, _, err := iss.Create(s, at, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	now := time.Now()
	cases := []struct {
		name  string
		conn  string
		token string
		admit bool
	}{
		{"exact identity", "n1.example.net", mk(dev, token.Scope{Identity: "n1.example.net"}, now, time.Hour), true},
		{"pattern", "web-7.example.net", mk(dev, token.Scope{Pattern: "web-*.example.net"}, now, time.Hour), true},
		{"no token", "n2.example.net", "", false},
		{"garbage token", "n3.example.net", "not-a-jwt", false},
		{"expired", "n4.example.net", mk(dev, token.Scope{Identity: "n4.example.net"}, now.Add(-2*time.Hour), time.Hour), false},
		{"other identity", "n5.example.net", mk(dev, token.Scope{Identity: "n1.example.net"}, now, time.Hour), false},
		{"outside pattern", "db-1.example.net", mk(dev, token.Scope{Pattern: "web-*.example.net"}, now, time.Hour), false},
		{"unknown issuer", "n6.example.net", mk(other, token.Scope{Identity: "n6.example.net"}, now, time.Hour), false},
		{"no identity as name", "", mk(dev, token.Scope{}, now, time.Hour), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			opts := []nats.Option{}
			if tc.conn != "" {
				opts = append(opts, nats.Name(tc.conn))
			}
			if tc.token != "" {
				opts = append(opts, nats.Token(tc.token))
			}
			nc, err := dial(b, opts...)
			if tc.admit {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				nc.Close()
				return
			}
			if err == nil {
				nc.Close()
				t.Fatal("admitted")
			}
		})
	}
	if b.auth.tokenFails.Load() == 0 {
		t.Error("token refusals not counted")
	}
}

// TestDuplicateIdentity checks that a second live connection claiming an
// identity is refused, and that one from another address is announced to
// provisioners.
func TestDuplicateIdentity(t *testing.T) {
	b := startBroker(t)
	prov := connect(t, b, provisionerOpt(t, b))
	adv, err := prov.SubscribeSync(protocol.AdvisoryDuplicateIdentity)
	if err != nil {
		t.Fatal(err)
	}
	if err := prov.Flush(); err != nil {
		t.Fatal(err)
	}
	first := connect(t, b, nodeOpts(t, b, "dup.example.net")...)

	// Same address: refused, no advisory (most likely the node itself
	// reconnecting before the broker saw its old connection die).
	if nc, err := dial(b, nodeOpts(t, b, "dup.example.net")...); err == nil {
		nc.Close()
		t.Fatal("second connection from the same address admitted")
	}
	if _, err := adv.NextMsg(200 * time.Millisecond); err == nil {
		t.Fatal("advisory for a same-address duplicate")
	}

	// Another address (127.0.0.2 is loopback too): refused and announced.
	other := nats.SetCustomDialer(&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}, Timeout: 5 * time.Second})
	if nc, err := dial(b, append(nodeOpts(t, b, "dup.example.net"), other)...); err == nil {
		nc.Close()
		t.Fatal("second connection from another address admitted")
	}
	msg, err := adv.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no advisory: %v", err)
	}
	d, err := protocol.DecodeDuplicateIdentity(msg.Data)
	if err != nil || d.Identity != "dup.example.net" {
		t.Fatalf("advisory %+v %v", d, err)
	}
	if b.auth.duplicates.Load() != 2 {
		t.Errorf("duplicates counted %d, want 2", b.auth.duplicates.Load())
	}

	// Once the first connection is gone the identity can connect again.
	first.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		nc, err := dial(b, nodeOpts(t, b, "dup.example.net")...)
		if err == nil {
			nc.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("identity cannot reconnect after its connection closed: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
