package provisioner

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// Test trust material, made once by TestMain: the provisioner's nkey seed
// file (its signing key), the agents' view of it, and a token issuer.
var (
	testSeedFile string
	testTrusted  *protocol.KeySet
	testIssuer   *token.Issuer
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "muster-provisioner-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := func() int {
		defer os.RemoveAll(dir)
		if err := makeTrust(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return m.Run()
	}()
	os.Exit(code)
}

func makeTrust(dir string) error {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return err
	}
	seed, _ := kp.Seed()
	pub, _ := kp.PublicKey()
	testSeedFile = filepath.Join(dir, "provisioner.nk")
	if err := os.WriteFile(testSeedFile, seed, 0o600); err != nil {
		return err
	}
	if testTrusted, err = protocol.NewKeySet([]string{pub}); err != nil {
		return err
	}
	iseed, _, err := token.GenerateIssuerSeed()
	if err != nil {
		return err
	}
	testIssuer, err = token.NewIssuer(iseed)
	return err
}

// nodeToken is a valid provisioning token for one identity.
func nodeToken(t testing.TB, identity string) string {
	t.Helper()
	tok, _, err := testIssuer.Create(token.Scope{Identity: identity}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestRogueBrokerGetsNoRequestSignature runs the provisioner against a
// fake broker (real TLS, a certificate the provisioner trusts) whose
// connection "nonce" is the signing payload of a configure request: the
// provisioner must not sign it, or the broker could forge that request.
func TestRogueBrokerGetsNoRequestSignature(t *testing.T) {
	dir := t.TempDir()
	authority, err := ca.Init(filepath.Join(dir, "ca"), "Rogue broker CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	is, err := authority.Issue("127.0.0.1", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(is.CertPEM, is.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	forged := &protocol.Request{
		Protocol: protocol.RequestProtocol, ID: "forged", Sender: "rogue", Target: "victim.example.net",
		Agent: protocol.AgentProvision, Action: protocol.ActionConfigure, Time: time.Now().UTC(), TTL: 600,
		Body: json.RawMessage(`{"configuration":{"plugin.choria.middleware_hosts":"evil.example.net:4222"}}`),
	}
	payload := forged.SigningPayload()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	info, _ := json.Marshal(map[string]any{
		"server_id": "rogue", "version": "2.10.0", "proto": 1, "host": "127.0.0.1",
		"port": ln.Addr().(*net.TCPAddr).Port, "tls_required": true, "max_payload": 1 << 20,
		"nonce": string(payload),
	})
	attempts := make(chan string, 16) // what each connection sent after TLS: its CONNECT line, or ""
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := fmt.Fprintf(c, "INFO %s\r\n", info); err != nil {
					return
				}
				tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12})
				if err := tc.Handshake(); err != nil {
					return
				}
				line, _ := bufio.NewReader(tc).ReadString('\n')
				select {
				case attempts <- line:
				default:
				}
			}(c)
		}
	}()

	cfg := testConfig()
	cfg.Brokers = []string{"tls://" + ln.Addr().String()}
	cfg.TLSCA = filepath.Join(dir, "ca", ca.CertFile)
	log, _ := debugLogger()
	p, err := New(Options{Config: cfg, Helper: newTestHelper(newCA(t), nil), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = p.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	// One connection attempt is enough: the broker sent its nonce and got
	// whatever the provisioner was willing to sign.
	var line string
	select {
	case line = <-attempts:
	case <-time.After(30 * time.Second):
		t.Fatal("the provisioner never connected to the rogue broker")
	}
	var connect struct {
		Nkey string `json:"nkey"`
		Sig  string `json:"sig"`
	}
	if rest, ok := strings.CutPrefix(line, "CONNECT "); ok {
		if err := json.Unmarshal([]byte(rest), &connect); err != nil {
			t.Fatalf("CONNECT %q: %v", line, err)
		}
	}
	forged.Signer, forged.Signature = connect.Nkey, connect.Sig
	if connect.Sig != "" && forged.VerifySignature(testTrusted) == nil {
		t.Fatal("the provisioner signed the forged request as its connection nonce")
	}
}
