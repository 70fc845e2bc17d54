package broker

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/token"
)

// testLog returns a logger that writes nothing.
func testLog() *logrus.Entry { return logrus.NewEntry(logging.Discard()) }

// testConfig is a config on a random loopback port in a temporary store.
func testConfig(t *testing.T) Config {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Listen = "127.0.0.1:0"
	cfg.StoreDir = t.TempDir()
	return cfg
}

// startBroker starts a broker with the development PKI and shuts it down at
// the end of the test.
func startBroker(t *testing.T) *Broker {
	t.Helper()
	b, err := New(testConfig(t), testLog())
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := b.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(b.Shutdown)
	return b
}

// connect connects to b over TLS with the extra options.
func connect(t *testing.T, b *Broker, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := dial(b, opts...)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func dial(b *Broker, opts ...nats.Option) (*nats.Conn, error) {
	all := append([]nats.Option{nats.RootCAs(b.CAFile()), nats.NoReconnect(), nats.Timeout(5 * time.Second)}, opts...)
	return nats.Connect(b.ClientURL(), all...)
}

func adminOpt(b *Broker) nats.Option {
	return nats.ClientCert(b.DevPKI().AdminCert, b.DevPKI().AdminKey)
}

// nodeToken is a provisioning token for identity from the development
// token issuer.
func nodeToken(t *testing.T, b *Broker, identity string) string {
	t.Helper()
	seed, err := os.ReadFile(b.DevPKI().TokenIssuerSeed)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := token.NewIssuer(seed)
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := iss.Create(token.Scope{Identity: identity}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// nodeOpts are the options of an unprovisioned node named identity with a
// valid token.
func nodeOpts(t *testing.T, b *Broker, identity string) []nats.Option {
	t.Helper()
	return []nats.Option{nats.Name(identity), nats.Token(nodeToken(t, b, identity))}
}

func provisionerOpt(t *testing.T, b *Broker) nats.Option {
	t.Helper()
	o, err := nats.NkeyOptionFromSeed(b.DevPKI().ProvisionerSeed)
	if err != nil {
		t.Fatalf("nkey option: %v", err)
	}
	return o
}

// issueClient writes a client certificate for cn, signed by authority, to
// dir and returns the nats option that presents it.
func issueClient(t *testing.T, authority *ca.CA, dir, name, cn string) nats.Option {
	t.Helper()
	is, err := authority.Issue(cn, []string{"client.example.net"})
	if err != nil {
		t.Fatalf("issue %s: %v", cn, err)
	}
	cert, key, err := authority.WriteIssued(dir, name, is)
	if err != nil {
		t.Fatalf("write %s: %v", cn, err)
	}
	return nats.ClientCert(cert, key)
}

// forceClientCert writes a certificate for cn from authority and returns
// an option that always presents it, even when the server's list of
// acceptable CAs does not name its issuer (Go clients otherwise send no
// certificate at all then).
func forceClientCert(t *testing.T, b *Broker, authority *ca.CA, dir, name, cn string) nats.Option {
	t.Helper()
	is, err := authority.Issue(cn, []string{"client.example.net"})
	if err != nil {
		t.Fatalf("issue %s: %v", cn, err)
	}
	cert, err := tls.X509KeyPair(append(is.CertPEM, authority.CertificatePEM()...), is.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(b.CAPEM())
	return nats.Secure(&tls.Config{
		RootCAs:    roots,
		MinVersion: tls.VersionTLS12,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &cert, nil
		},
	})
}

// devCA loads the broker's development CA.
func devCA(t *testing.T, b *Broker) *ca.CA {
	t.Helper()
	authority, err := ca.LoadDir(b.DevPKI().Dir, 0)
	if err != nil {
		t.Fatalf("load dev ca: %v", err)
	}
	return authority
}

// connUser returns the account and user of the connection named name, from
// the server's connection list.
func connUser(t *testing.T, b *Broker, name string) (string, string) {
	t.Helper()
	cz, err := b.Server().Connz(&server.ConnzOptions{Username: true, Limit: 1000})
	if err != nil {
		t.Fatalf("connz: %v", err)
	}
	for _, c := range cz.Conns {
		if c.Name == name {
			return c.Account, c.AuthorizedUser
		}
	}
	t.Fatalf("no connection named %q", name)
	return "", ""
}

// expectMsg waits for a message on sub.
func expectMsg(t *testing.T, sub *nats.Subscription, subject string) {
	t.Helper()
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no message on %s: %v", sub.Subject, err)
	}
	if m.Subject != subject {
		t.Fatalf("subject %q, want %q", m.Subject, subject)
	}
}

// expectNoMsg flushes a round trip through both connections and checks
// that sub got nothing.
func expectNoMsg(t *testing.T, sub *nats.Subscription, conns ...*nats.Conn) {
	t.Helper()
	for _, nc := range conns {
		if err := nc.Flush(); err != nil {
			t.Fatalf("flush: %v", err)
		}
	}
	if n, _, _ := sub.Pending(); n != 0 {
		m, _ := sub.NextMsg(0)
		t.Fatalf("unexpected message on %s", m.Subject)
	}
}

func TestConfigValidate(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name   string
		mutate func(*Config)
		want   []string
	}{
		{"defaults", func(*Config) {}, nil},
		{"bad listen", func(c *Config) { c.Listen = "nope" }, []string{`listen "nope"`}},
		{"bad port", func(c *Config) { c.Listen = "127.0.0.1:99999" }, []string{`listen "127.0.0.1:99999"`}},
		{"empty store", func(c *Config) { c.StoreDir = "" }, []string{`store_dir ""`}},
		{"bad monitor", func(c *Config) { c.MonitorListen = "x" }, []string{`monitor_listen "x"`}},
		{"bad metrics", func(c *Config) { c.MetricsListen = "1:2:3" }, []string{`metrics_listen "1:2:3"`}},
		{"partial tls", func(c *Config) { c.TLS.Cert = filepath.Join(dir, "missing.pem") }, []string{"tls.cert", `tls.key ""`, `tls.ca ""`}},
		{"bad provisioner", func(c *Config) { c.Provisioners = []string{"SUABC"} }, []string{`provisioners[0] "SUABC"`}},
		{"bad admin", func(c *Config) { c.Admins = []string{"ok", "bad name"} }, []string{`admins[1] "bad name"`}},
		{"bad level", func(c *Config) { c.LogLevel = "loud" }, []string{`loglevel "loud"`}},
		{"zero payload", func(c *Config) { c.MaxPayload = 0 }, []string{`max_payload "0"`}},
		{"huge payload", func(c *Config) { c.MaxPayload = MaxMaxPayload + 1 }, []string{"max_payload"}},
		{"short tls timeout", func(c *Config) { c.TLSTimeout = 0.1 }, []string{`tls_timeout "0.1"`}},
		{"long tls timeout", func(c *Config) { c.TLSTimeout = MaxTLSTimeout + 1 }, []string{"tls_timeout"}},
		{"zero tls timeout", func(c *Config) { c.TLSTimeout = 0 }, []string{"tls_timeout"}},
		{"every problem", func(c *Config) {
			c.Listen, c.StoreDir, c.LogLevel, c.MaxPayload = "", "", "loud", -1
		}, []string{"listen", "store_dir", "loglevel", "max_payload"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			tc.mutate(&cfg)
			err := cfg.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("Validate = %v, want ErrInvalidConfig", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	cases := []struct {
		name    string
		path    string
		wantErr string
		check   func(t *testing.T, c Config)
	}{
		{"no file", "", "", func(t *testing.T, c Config) {
			if c.Listen != DefaultListen || c.MaxPayload != DefaultMaxPayload || c.TLSTimeout != DefaultTLSTimeout {
				t.Errorf("defaults not applied: %+v", c)
			}
		}},
		{"empty file", write("empty.yaml", ""), "", func(t *testing.T, c Config) {
			if c.StoreDir != DefaultStoreDir {
				t.Errorf("store_dir = %q", c.StoreDir)
			}
		}},
		{"values", write("ok.yaml", "listen: 0.0.0.0:4333\nprovisioners: ["+pub+"]\nadmins: [ops.example.net]\nmax_payload: 2048\ntls_timeout: 2.5\n"), "", func(t *testing.T, c Config) {
			if c.Listen != "0.0.0.0:4333" || c.MaxPayload != 2048 || c.TLSTimeout != 2.5 || len(c.Provisioners) != 1 || c.Admins[0] != "ops.example.net" {
				t.Errorf("config = %+v", c)
			}
			if c.LogLevel != DefaultLogLevel {
				t.Errorf("loglevel default lost: %q", c.LogLevel)
			}
		}},
		{"unknown key", write("unknown.yaml", "listen: 127.0.0.1:1\nlisten_port: 3\n"), "listen_port", nil},
		{"unknown tls key", write("tls.yaml", "tls:\n  certificate: x\n"), "certificate", nil},
		{"invalid value", write("bad.yaml", "loglevel: loud\n"), "loglevel", nil},
		{"missing file", filepath.Join(dir, "nope.yaml"), "nope.yaml", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := LoadConfig(tc.path)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("LoadConfig = %v, want error mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("LoadConfig: %v", err)
			}
			tc.check(t, c)
		})
	}
}

func TestDevPKICreatedOnceAndReused(t *testing.T) {
	cfg := testConfig(t)
	b1, err := New(cfg, testLog())
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	d := b1.DevPKI()
	if d == nil {
		t.Fatal("no dev PKI")
	}
	files := []string{d.CACert, d.CAKey, d.ServerCert, d.ServerKey, d.AdminCert, d.AdminKey, d.ProvisionerSeed}
	before := map[string]string{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatalf("read %s: %v", f, err)
		}
		before[f] = string(data)
	}
	for _, f := range []string{d.CAKey, d.ServerKey, d.AdminKey, d.ProvisionerSeed} {
		st, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, st.Mode().Perm())
		}
	}
	if !contains(b1.cfg.Provisioners, d.ProvisionerPublicKey) || !contains(b1.cfg.Admins, DevAdminCN) {
		t.Errorf("dev provisioner/admin not authorised: %v %v", b1.cfg.Provisioners, b1.cfg.Admins)
	}
	if !strings.HasPrefix(b1.CAPin(), "sha256:") || b1.CAFile() != d.CACert || len(b1.CAPEM()) == 0 {
		t.Errorf("CA accessors: %q %q", b1.CAPin(), b1.CAFile())
	}

	b2, err := New(cfg, testLog())
	if err != nil {
		t.Fatalf("second New: %v", err)
	}
	if b2.DevPKI().ProvisionerPublicKey != d.ProvisionerPublicKey || b2.CAPin() != b1.CAPin() {
		t.Error("second start made a new PKI")
	}
	for _, f := range files {
		data, _ := os.ReadFile(f)
		if string(data) != before[f] {
			t.Errorf("%s changed on the second start", f)
		}
	}

	// With TLS configured there is no dev PKI.
	cfg2 := testConfig(t)
	cfg2.TLS = TLSFiles{Cert: d.ServerCert, Key: d.ServerKey, CA: d.CACert}
	cfg2.TokenIssuers = []string{d.TokenIssuerPublicKey}
	b3, err := New(cfg2, testLog())
	if err != nil {
		t.Fatalf("New with TLS: %v", err)
	}
	if b3.DevPKI() != nil {
		t.Error("dev PKI made although TLS is configured")
	}
	if _, err := os.Stat(filepath.Join(cfg2.StoreDir, DevPKIDir)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pki dir exists with TLS configured: %v", err)
	}
}

func TestDevPKIReissuesServerCertForNewHost(t *testing.T) {
	cfg := testConfig(t)
	b1, err := New(cfg, testLog())
	if err != nil {
		t.Fatal(err)
	}
	old, _ := os.ReadFile(b1.DevPKI().ServerCert)
	cfg.Listen = "127.0.0.2:0"
	b2, err := New(cfg, testLog())
	if err != nil {
		t.Fatal(err)
	}
	now, _ := os.ReadFile(b2.DevPKI().ServerCert)
	if string(old) == string(now) {
		t.Error("server certificate not reissued for the new listen host")
	}
	if b1.CAPin() != b2.CAPin() {
		t.Error("CA changed")
	}
}

func contains(list []string, v string) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

func TestUnprovisionedNodeLandsInProvisioning(t *testing.T) {
	b := startBroker(t)
	node := connect(t, b, nodeOpts(t, b, "node")...)
	prov := connect(t, b, nats.Name("prov"), provisionerOpt(t, b))
	admin := connect(t, b, nats.Name("admin"), adminOpt(b))

	if acc, user := connUser(t, b, "node"); acc != PROVISIONING || user != UnprovisionedUser {
		t.Errorf("node: account %q user %q", acc, user)
	}
	if acc, user := connUser(t, b, "prov"); acc != PROVISIONING || user != b.DevPKI().ProvisionerPublicKey {
		t.Errorf("provisioner: account %q user %q", acc, user)
	}
	if acc, user := connUser(t, b, "admin"); acc != PRODUCTION || user != DevAdminCN {
		t.Errorf("admin: account %q user %q", acc, user)
	}

	// A node may use its own node subject; the provisioner sees everything
	// in PROVISIONING.
	own, err := node.SubscribeSync("provisioning.node.node")
	if err != nil {
		t.Fatal(err)
	}
	provSub, err := prov.SubscribeSync("choria.>")
	if err != nil {
		t.Fatal(err)
	}
	prodSub, err := admin.SubscribeSync(">")
	if err != nil {
		t.Fatal(err)
	}
	for _, nc := range []*nats.Conn{node, prov, admin} {
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if err := node.Publish("choria.provisioning_data.node", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, provSub, "choria.provisioning_data.node")
	if err := prov.Publish("provisioning.node.node", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, own, "provisioning.node.node")
	expectNoMsg(t, prodSub, node, admin)
}

// permErrors connects with an error handler that collects permission
// violations.
func permErrors(t *testing.T, b *Broker, opts ...nats.Option) (*nats.Conn, <-chan error) {
	t.Helper()
	errs := make(chan error, 16)
	opts = append(opts, nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		select {
		case errs <- err:
		default:
		}
	}))
	return connect(t, b, opts...), errs
}

func expectViolation(t *testing.T, errs <-chan error, what string) {
	t.Helper()
	select {
	case err := <-errs:
		if !errors.Is(err, nats.ErrPermissionViolation) && !strings.Contains(err.Error(), "Permissions Violation") {
			t.Fatalf("%s: error %v, want a permissions violation", what, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s was allowed", what)
	}
}

func TestNodePermissions(t *testing.T) {
	b := startBroker(t)
	prov := connect(t, b, provisionerOpt(t, b))
	victim := connect(t, b, nodeOpts(t, b, "victim.example.net")...)
	victimSub, err := victim.SubscribeSync("provisioning.node.victim.example.net")
	if err != nil {
		t.Fatal(err)
	}
	victim.Flush()

	cases := []struct {
		name string
		opts []nats.Option
		sub  []string
		pub  []string
	}{
		{"unprovisioned", nodeOpts(t, b, "rogue.example.net"),
			[]string{">", "provisioning.node.victim.example.net", "provisioning.node.>", "choria.provisioning_data.>", "_INBOX.>", "production.>"},
			[]string{"provisioning.node.victim.example.net", "provisioning.broadcast.agent.discovery",
				// as another identity, or as no one
				"choria.provisioning_data.victim.example.net", "choria.provisioning_data",
				"choria.lifecycle.event.startup.muster-agent.victim.example.net", "choria.lifecycle.event.startup.muster-agent",
				// an identity that extends its own: the subject would end in another's
				"choria.provisioning_data.rogue.example.net.victim", "muster.advisory.duplicate_identity"}},
		{"production node", []nats.Option{issueClient(t, devCA(t, b), t.TempDir(), "rogue", "rogue.example.net")},
			[]string{">", "mcollective.node.victim.example.net", "choria.provisioning_data.>", "provisioning.node.rogue.example.net"},
			[]string{"mcollective.node.victim.example.net", "choria.provisioning_data.rogue.example.net",
				"choria.lifecycle.event.provisioned.muster-agent.victim.example.net", "choria.lifecycle.event.provisioned.muster-agent",
				"provisioning.node.victim.example.net"}},
		// Only the provisioner sends provisioning requests, in any account.
		{"admin", []nats.Option{adminOpt(b)}, nil,
			[]string{"provisioning.node.victim.example.net", "provisioning.broadcast.agent.discovery"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			nc, errs := permErrors(t, b, tc.opts...)
			for _, subj := range tc.sub {
				if _, err := nc.SubscribeSync(subj); err != nil {
					t.Fatal(err)
				}
				nc.Flush()
				expectViolation(t, errs, "subscribe "+subj)
			}
			for _, subj := range tc.pub {
				if err := nc.Publish(subj, []byte("{}")); err != nil {
					t.Fatal(err)
				}
				nc.Flush()
				expectViolation(t, errs, "publish "+subj)
			}
		})
	}
	// Nothing the rogues published reached the victim; the provisioner still
	// can.
	if err := prov.Publish("provisioning.node.victim.example.net", []byte("real")); err != nil {
		t.Fatal(err)
	}
	m, err := victimSub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if string(m.Data) != "real" {
		t.Fatalf("victim received %q first", m.Data)
	}
}

func TestCertificateConnections(t *testing.T) {
	b := startBroker(t)
	authority := devCA(t, b)
	dir := t.TempDir()
	foreign, err := ca.Init(filepath.Join(dir, "foreign"), "Foreign CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name     string
		opt      nats.Option
		wantAcc  string
		wantUser string
	}{
		{"production node", issueClient(t, authority, dir, "node", "node1.example.net"), PRODUCTION, "node1.example.net"},
		{"admin", adminOpt(b), PRODUCTION, DevAdminCN},
		{"foreign CA", forceClientCert(t, b, foreign, dir, "foreign", "node2.example.net"), "", ""},
		// Without a certificate the broker sees an unprovisioned node, and
		// without a provisioning token it refuses it.
		{"foreign CA, certificate not sent", issueClient(t, foreign, dir, "foreign", "node3.example.net"), "", ""},
		{"own CA, forced", forceClientCert(t, b, authority, dir, "forced", "node4.example.net"), PRODUCTION, "node4.example.net"},
		{"invalid identity", issueClient(t, authority, dir, "invalid", "bad name"), "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			nc, err := dial(b, tc.opt, nats.Name(tc.name))
			if tc.wantAcc == "" {
				if err == nil {
					nc.Close()
					t.Fatal("connection accepted, want refused")
				}
				return
			}
			if err != nil {
				t.Fatalf("connect: %v", err)
			}
			defer nc.Close()
			if acc, user := connUser(t, b, tc.name); acc != tc.wantAcc || user != tc.wantUser {
				t.Errorf("account %q user %q, want %q %q", acc, user, tc.wantAcc, tc.wantUser)
			}
		})
	}
}

// TestServerChainCarriesCA checks that the broker sends its CA with its
// certificate: an agent given only the CA's pin (no CA file) finds its
// trust anchor among the certificates the broker sends.
func TestServerChainCarriesCA(t *testing.T) {
	b := startBroker(t)
	nc := connect(t, b, adminOpt(b))
	st, err := nc.TLSConnectionState()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range st.PeerCertificates[1:] {
		if pki.Pin(c) == b.CAPin() {
			return
		}
	}
	t.Fatalf("the broker's %d certificates hold none with the CA's pin %s", len(st.PeerCertificates), b.CAPin())
}

func TestNkeyConnections(t *testing.T) {
	b := startBroker(t)
	stranger, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	strangerPub, _ := stranger.PublicKey()
	listed, err := nkeys.FromSeed(mustRead(t, b.DevPKI().ProvisionerSeed))
	if err != nil {
		t.Fatal(err)
	}
	listedPub, _ := listed.PublicKey()
	cases := []struct {
		name string
		opt  nats.Option
		ok   bool
	}{
		{"listed provisioner", provisionerOpt(t, b), true},
		{"unknown nkey", nats.Nkey(strangerPub, stranger.Sign), false},
		{"listed key, wrong signer", nats.Nkey(listedPub, stranger.Sign), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			nc, err := dial(b, tc.opt)
			if tc.ok && err != nil {
				t.Fatalf("connect: %v", err)
			}
			if !tc.ok && err == nil {
				nc.Close()
				t.Fatal("connection accepted, want refused")
			}
			if nc != nil {
				nc.Close()
			}
		})
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestProvisionerCreatesKVBucket(t *testing.T) {
	b := startBroker(t)
	nc := connect(t, b, provisionerOpt(t, b))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "MUSTER_NODES"})
	if err != nil {
		t.Fatalf("create kv: %v", err)
	}
	if prod, err := b.Server().LookupAccount(PRODUCTION); err != nil || prod.JetStreamEnabled() {
		t.Errorf("JetStream enabled on %s (%v)", PRODUCTION, err)
	}
	if _, err := kv.Put(ctx, "node1", []byte("waiting")); err != nil {
		t.Fatalf("put: %v", err)
	}
	e, err := kv.Get(ctx, "node1")
	if err != nil || string(e.Value()) != "waiting" {
		t.Fatalf("get: %v %v", e, err)
	}
}

func TestLifecycleImport(t *testing.T) {
	b := startBroker(t)
	prov := connect(t, b, provisionerOpt(t, b))
	node := connect(t, b, nodeOpts(t, b, "node2.example.net")...)
	prod := connect(t, b, issueClient(t, devCA(t, b), t.TempDir(), "node", "node1.example.net"))

	sub, err := prov.SubscribeSync("production.choria.lifecycle.event.>")
	if err != nil {
		t.Fatal(err)
	}
	nodeSub, err := node.SubscribeSync("choria.lifecycle.event.>")
	if err != nil {
		t.Fatal(err)
	}
	if err := prov.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := node.Flush(); err != nil {
		t.Fatal(err)
	}
	subject := "choria.lifecycle.event.provisioned.muster-agent.node1.example.net"
	// The import is set up asynchronously on the subscriber's side; poll by
	// publishing until the first event arrives.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if err := prod.Publish(subject, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
		if _, err := sub.NextMsg(200 * time.Millisecond); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no lifecycle event in PROVISIONING")
		}
	}
	if err := prod.Publish(subject, []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("second event: %v", err)
		}
		if m.Subject != "production."+subject {
			t.Fatalf("subject %q", m.Subject)
		}
		if n, _, _ := sub.Pending(); n == 0 {
			break
		}
	}
	// Only the prefixed import is visible; the unprefixed subject in
	// PROVISIONING stays separate.
	expectNoMsg(t, nodeSub, prod, node)
}

func TestInProcessConnection(t *testing.T) {
	b := startBroker(t)
	cases := []struct {
		name     string
		opts     []nats.Option
		wantUser string
	}{
		{"unprovisioned", []nats.Option{nats.Token(nodeToken(t, b, "inproc-unprovisioned"))}, UnprovisionedUser},
		{"provisioner", []nats.Option{provisionerOpt(t, b)}, b.DevPKI().ProvisionerPublicKey},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			opts := append([]nats.Option{nats.InProcessServer(b.Server()), nats.Name("inproc-" + tc.name)}, tc.opts...)
			nc, err := nats.Connect("", opts...)
			if err != nil {
				t.Fatalf("in-process connect: %v", err)
			}
			defer nc.Close()
			if acc, user := connUser(t, b, "inproc-"+tc.name); acc != PROVISIONING || user != tc.wantUser {
				t.Errorf("account %q user %q", acc, user)
			}
			if err := nc.FlushTimeout(5 * time.Second); err != nil {
				t.Errorf("round trip: %v", err)
			}
		})
	}
}

func TestPlaintextRefused(t *testing.T) {
	b := startBroker(t)
	addr := strings.TrimPrefix(b.ClientURL(), "tls://")
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	info, err := r.ReadString('\n')
	if err != nil || !strings.Contains(info, `"tls_required":true`) {
		t.Fatalf("INFO %q (%v), want tls_required", info, err)
	}
	if _, err := conn.Write([]byte("CONNECT {\"verbose\":false}\r\nPING\r\n")); err != nil {
		return // closed already: refused
	}
	// The server expects a TLS handshake after INFO and closes the
	// connection when plaintext arrives instead.
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return // connection closed: refused
		}
		if strings.HasPrefix(line, "PONG") {
			t.Fatal("plaintext client got PONG")
		}
	}
}

func TestCollector(t *testing.T) {
	b := startBroker(t)
	connect(t, b, nodeOpts(t, b, "node")...)
	connect(t, b, adminOpt(b))
	if _, err := dial(b, nats.Nkey("UAFAKE", func([]byte) ([]byte, error) { return nil, nil })); err == nil {
		t.Fatal("fake nkey accepted")
	}

	reg := prometheus.NewRegistry()
	if err := reg.Register(NewCollector(b)); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint %s: %s", p.Metric, p.Text)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += "{" + l.GetValue() + "}"
			}
			v := m.GetGauge().GetValue() + m.GetCounter().GetValue()
			got[key] = v
		}
	}
	want := map[string]func(float64) bool{
		"muster_broker_up":                                   func(v float64) bool { return v == 1 },
		"muster_broker_connections":                          func(v float64) bool { return v >= 2 },
		"muster_broker_connections_total":                    func(v float64) bool { return v >= 2 },
		"muster_broker_subscriptions":                        func(v float64) bool { return v >= 0 },
		"muster_broker_received_messages_total":              func(v float64) bool { return v >= 0 },
		"muster_broker_sent_messages_total":                  func(v float64) bool { return v >= 0 },
		"muster_broker_received_bytes_total":                 func(v float64) bool { return v >= 0 },
		"muster_broker_sent_bytes_total":                     func(v float64) bool { return v >= 0 },
		"muster_broker_slow_consumers_total":                 func(v float64) bool { return v == 0 },
		"muster_broker_account_connections{PRODUCTION}":      func(v float64) bool { return v == 1 },
		"muster_broker_account_connections{PROVISIONING}":    func(v float64) bool { return v == 2 }, // the node and the broker's advisory connection
		"muster_broker_authentications_total{admin}":         func(v float64) bool { return v == 1 },
		"muster_broker_authentications_total{rejected}":      func(v float64) bool { return v >= 1 },
		"muster_broker_authentications_total{unprovisioned}": func(v float64) bool { return v == 1 },
		"muster_broker_jetstream_enabled":                    func(v float64) bool { return v == 1 },
		"muster_broker_cluster_peers":                        func(v float64) bool { return v == 0 },
	}
	for name, ok := range want {
		v, found := got[name]
		if !found {
			t.Errorf("missing %s", name)
			continue
		}
		if !ok(v) {
			t.Errorf("%s = %v", name, v)
		}
	}

	b.Shutdown()
	mfs, err = reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "muster_broker_up" && mf.GetMetric()[0].GetGauge().GetValue() != 0 {
			t.Error("muster_broker_up is not 0 after shutdown")
		}
	}
}

func TestRunShutdownIdempotent(t *testing.T) {
	b, err := New(testConfig(t), testLog())
	if err != nil {
		t.Fatal(err)
	}
	b.Shutdown() // before start: no-op
	b2, err := New(testConfig(t), testLog())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b2.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for b2.Server() == nil || !b2.Server().Running() {
		if time.Now().After(deadline) {
			t.Fatal("broker did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	connect(t, b2, nodeOpts(t, b2, "node")...)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
	}
	b2.Shutdown()
	b2.Shutdown()
	if err := b2.Start(); !errors.Is(err, ErrShutdown) {
		t.Errorf("Start after Shutdown = %v, want ErrShutdown", err)
	}
	if b2.Server().Running() {
		t.Error("server still running")
	}
	var sb strings.Builder
	if err := pprof.Lookup("goroutine").WriteTo(&sb, 2); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(sb.String(), "broker.(*Broker)") {
		t.Errorf("broker goroutine left after shutdown:\n%s", sb.String())
	}
}

func TestStartTwice(t *testing.T) {
	b := startBroker(t)
	if err := b.Start(); !errors.Is(err, ErrAlreadyStarted) {
		t.Errorf("second Start = %v, want ErrAlreadyStarted", err)
	}
}

func TestStartFailsOnBusyPort(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cfg := testConfig(t)
	cfg.Listen = l.Addr().String()
	b, err := New(cfg, testLog())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Shutdown()
	err = b.Run(context.Background())
	if !errors.Is(err, ErrServerFailed) {
		t.Fatalf("Run on a busy port = %v, want ErrServerFailed", err)
	}
	if err := b.Start(); !errors.Is(err, ErrShutdown) {
		t.Errorf("Start after a failed Start = %v, want ErrShutdown", err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	cfg := testConfig(t)
	cfg.MaxPayload = 0
	if _, err := New(cfg, testLog()); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("New = %v, want ErrInvalidConfig", err)
	}
	if _, err := New(testConfig(t), nil); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("New(nil logger) = %v, want ErrInvalidConfig", err)
	}
}

func TestExampleConfig(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "examples", "broker.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	// The example's TLS files exist only in a deployment: point them at
	// real files and check every other key and value.
	cfg, err := ParseConfig(data)
	if err != nil && !strings.Contains(err.Error(), "tls.") {
		t.Fatalf("example: %v", err)
	}
	b := startBroker(t)
	cfg.TLS = TLSFiles{Cert: b.DevPKI().ServerCert, Key: b.DevPKI().ServerKey, CA: b.DevPKI().CACert}
	if !slices.Equal(cfg.TokenIssuers, []string{exampleIssuer}) {
		t.Errorf("example token_issuers %v", cfg.TokenIssuers)
	}
	cfg.TokenIssuers = []string{b.DevPKI().TokenIssuerPublicKey}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("example: %v", err)
	}
	if len(cfg.Provisioners) != 1 || len(cfg.Admins) != 1 || cfg.MetricsListen == "" {
		t.Errorf("example not fully read: %+v", cfg)
	}
}

func TestRunReturnsWhenServerStops(t *testing.T) {
	b := startBroker(t)
	done := make(chan error, 1)
	go func() { done <- b.Run(context.Background()) }()
	b.Server().Shutdown() // the server going away on its own
	select {
	case err := <-done:
		if !errors.Is(err, ErrServerFailed) {
			t.Fatalf("Run = %v, want ErrServerFailed", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return after the server stopped")
	}
}

// TestProductionEventsInProvisioningJetStream: a JetStream stream in the
// provisioning account keeps the production lifecycle events it imports, so
// provisioners can consume node arrivals durably (docs/ha.md).
func TestProductionEventsInProvisioningJetStream(t *testing.T) {
	b := startBroker(t)
	prov := connect(t, b, provisionerOpt(t, b))
	js, err := jetstream.New(prov)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "ARRIVALS_TEST", Subjects: []string{"production.choria.lifecycle.event.provisioned.>"}})
	if err != nil {
		t.Fatal(err)
	}
	node := connect(t, b, issueClient(t, devCA(t, b), t.TempDir(), "node", "node1.example.net"))
	if err := node.Publish("choria.lifecycle.event.provisioned.muster-agent.node1.example.net", []byte(`{"id":"e1"}`)); err != nil {
		t.Fatal(err)
	}
	if err := node.Flush(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the event in the stream", func() bool {
		info, err := st.Info(ctx)
		return err == nil && info.State.Msgs == 1
	})
	m, err := st.GetLastMsgForSubject(ctx, "production.choria.lifecycle.event.provisioned.muster-agent.node1.example.net")
	if err != nil || string(m.Data) != `{"id":"e1"}` {
		t.Fatalf("stored %+v %v", m, err)
	}
}

// TestNoEarlyPingOnSlowConnect: a client whose connect is slow gets the
// PONG of its handshake before any PING of the broker. nats-server pings a
// client 2 s after its CONNECT when it has been silent since (by default);
// when a loaded broker is that slow between a client's CONNECT and its
// PING, the client reads the broker's PING where it waits for its PONG and
// gives up (nats.go: "expected 'PONG', got 'PING'"), and a site powering
// on all at once does thousands of TLS handshakes twice. The client below
// sends CONNECT, stays silent for 3 s, then sends PING.
func TestNoEarlyPingOnSlowConnect(t *testing.T) {
	b := startBroker(t)
	raw, u, _ := dialRaw(t, b)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(b.CAPEM())
	tc := tls.Client(raw, &tls.Config{RootCAs: pool, ServerName: u.Hostname()})
	if err := tc.Handshake(); err != nil {
		t.Fatalf("tls: %v", err)
	}
	const id = "slow.example.net"
	connect, _ := json.Marshal(map[string]any{"name": id, "auth_token": nodeToken(t, b, id), "verbose": false, "pedantic": false, "tls_required": true, "protocol": 1})
	if _, err := tc.Write(append(append([]byte("CONNECT "), connect...), "\r\n"...)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	if _, err := tc.Write([]byte("PING\r\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(tc).ReadString('\n')
	if err != nil || line != "PONG\r\n" {
		t.Fatalf("first line from the broker after a slow CONNECT: %q (%v), want PONG", line, err)
	}
}

// TestTLSTimeout checks that tls_timeout reaches nats-server: a client
// that opens a connection and never starts its TLS handshake is closed
// by the broker once the timeout passes. The default (30 s) would outlast
// the read deadline below.
func TestTLSTimeout(t *testing.T) {
	cfg := testConfig(t)
	cfg.TLSTimeout = MinTLSTimeout
	b, err := New(cfg, testLog())
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := b.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(b.Shutdown)
	_, _, r := dialRaw(t, b)
	_, err = r.ReadByte()
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the broker kept a connection without a TLS handshake open: %v", err)
	}
}

// dialRaw opens a plain TCP connection to b's client port, with a 15 s
// deadline, and reads the broker's INFO line; it returns the connection,
// the client URL and the reader holding what followed the INFO. The
// connection is closed when the test ends.
func dialRaw(t *testing.T, b *Broker) (net.Conn, *url.URL, *bufio.Reader) {
	t.Helper()
	u, err := url.Parse(b.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	raw.SetDeadline(time.Now().Add(15 * time.Second))
	r := bufio.NewReader(raw)
	info, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(info, "INFO ") {
		t.Fatalf("no INFO: %q %v", info, err)
	}
	return raw, u, r
}
