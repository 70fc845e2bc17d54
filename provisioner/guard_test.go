package provisioner

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/protocol"
)

func TestSANPatterns(t *testing.T) {
	const id = "node1.example.net"
	cases := []struct {
		pattern string
		kind    sanKind
		value   string
		want    bool
	}{
		{"{identity}", sanDNS, id, true},
		{"{identity}", sanDNS, "NODE1.example.net", true},
		{"{identity}", sanDNS, "node2.example.net", false},
		{"{identity}", sanDNS, "x." + id, false},
		{"*.example.net", sanDNS, "node9.example.net", true},
		{"*.example.net", sanDNS, "a.b.example.net", false},
		{"*.example.net", sanDNS, "example.net", false},
		{"*.*.example.net", sanDNS, "a.b.example.net", true},
		{"web-*.example.net", sanDNS, "web-12.example.net", true},
		{"web-*.example.net", sanDNS, "db-12.example.net", false},
		{"{identity}.mgmt.example.net", sanDNS, id + ".mgmt.example.net", true},
		{"*", sanDNS, "localhost", true},
		{"*", sanDNS, "a.b", false},
		{"spiffe://example.net/node/{identity}", sanURI, "spiffe://example.net/node/" + id, true},
		{"spiffe://example.net/node/*", sanURI, "spiffe://example.net/node/x/y", false},
		{"spiffe://example.net/node/*", sanURI, "spiffe://example.net/node/x", true},
		{"*@example.net", sanEmail, "ops@example.net", true},
		{"*@example.net", sanEmail, "ops@evil.example.net", false},
		{"*.example.net", sanURI, "spiffe://node1.example.net", false},
	}
	for _, tc := range cases {
		sp, err := compileSANPattern(tc.pattern)
		if err != nil {
			t.Fatalf("%q: %v", tc.pattern, err)
		}
		if got := sp.matchString(tc.kind, tc.value, id); got != tc.want {
			t.Errorf("%q against %q: %v, want %v", tc.pattern, tc.value, got, tc.want)
		}
	}
	for _, bad := range []string{"", "a b", "{host}.example.net", "bad/char", "a..b", ".a", "10.0.0.1/8", "://x", "a@b@c", "fe80::1%eth0", "é.example.net"} {
		if _, err := compileSANPattern(bad); err == nil {
			t.Errorf("pattern %q accepted", bad)
		}
	}
	g, err := newGuard(Policy{SANAllow: []string{"10.0.0.0/8", "192.0.2.7", "{identity}"}, KeyTypes: []string{PolicyKeyECDSAP256}, RSAMinBits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	for ip, want := range map[string]bool{"10.1.2.3": true, "192.0.2.7": true, "192.0.2.8": false, "::ffff:10.0.0.1": true, "2001:db8::1": false} {
		csr := &x509.CertificateRequest{IPAddresses: []net.IP{net.ParseIP(ip)}}
		if err := g.checkSANs(csr, id); (err == nil) != want {
			t.Errorf("IP %s: %v, want allowed=%v", ip, err, want)
		}
	}
}

func TestPolicyValidate(t *testing.T) {
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, newCA(t).CertificatePEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	notCA := filepath.Join(t.TempDir(), "junk.pem")
	if err := os.WriteFile(notCA, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		tweak func(c *Config)
		want  string // "" = valid
	}{
		{"defaults", func(*Config) {}, ""},
		{"ca file", func(c *Config) { c.Policy.CAFile = caFile }, ""},
		{"bad ca file", func(c *Config) { c.Policy.CAFile = notCA }, "policy.ca_file"},
		{"missing ca file", func(c *Config) { c.Policy.CAFile = notCA + ".nope" }, "policy.ca_file"},
		{"bad pattern", func(c *Config) { c.Policy.SANAllow = []string{"{host}"} }, "policy.san_allow[0]"},
		{"unknown key type", func(c *Config) { c.Policy.KeyTypes = []string{"dsa"} }, "policy.key_types[0]"},
		{"no key types", func(c *Config) { c.Policy.KeyTypes = nil }, "at least one key type"},
		{"key_type not allowed", func(c *Config) { c.Policy.KeyTypes = []string{PolicyKeyEd25519} }, `must include key_type "ecdsa-p256"`},
		{"rsa_min_bits low", func(c *Config) { c.Policy.RSAMinBits = 1024 }, "policy.rsa_min_bits"},
		{"rsa nodes refused", func(c *Config) { c.KeyType = protocol.KeyRSA; c.Policy.RSAMinBits = 3072 }, "nodes generate 2048-bit"},
		{"state_dir is a file", func(c *Config) { c.StateDir = caFile }, "state_dir"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := testConfig()
			c.Brokers = []string{"nats://127.0.0.1:4222"}
			tc.tweak(&c)
			err := c.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, ErrConfig)):
				t.Fatalf("error %v, want one naming %q", err, tc.want)
			}
		})
	}
}

func TestPolicyYAML(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "p.yaml")
	data := "brokers: [nats://127.0.0.1:4222]\nnkey_seed_file: " + testSeedFile + "\ntoken_issuers: [" + testIssuer.PublicKey() + "]\nstate_dir: " + dir + "/state\npolicy:\n  san_allow: ['*.example.net', '10.0.0.0/8']\n  key_types: [ecdsa-p256]\n"
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(c.Policy.SANAllow, ",") != "*.example.net,10.0.0.0/8" || len(c.Policy.KeyTypes) != 1 || c.Policy.RSAMinBits != DefaultRSAMinBits || c.StateDir != dir+"/state" {
		t.Fatalf("policy %+v state_dir %q", c.Policy, c.StateDir)
	}
	if err := os.WriteFile(path, []byte("brokers: [nats://127.0.0.1:4222]\npolicy:\n  san_alow: []\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadConfig(path); err == nil || !strings.Contains(err.Error(), "san_alow") {
		t.Fatalf("unknown policy key: %v", err)
	}
}

// csrWith makes a key and a CSR for id with extra SANs.
func csrWith(key crypto.Signer, dns []string, ips []net.IP, uris []string) func(string) (crypto.Signer, []byte, error) {
	return func(id string) (crypto.Signer, []byte, error) {
		var us []*url.URL
		for _, u := range uris {
			pu, err := url.Parse(u)
			if err != nil {
				return nil, nil, err
			}
			us = append(us, pu)
		}
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
			Subject:     pkix.Name{CommonName: id},
			DNSNames:    append([]string{id}, dns...),
			IPAddresses: ips,
			URIs:        us,
		}, key)
		if err != nil {
			return nil, nil, err
		}
		return key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
	}
}

func mustKey(t *testing.T, kind string) crypto.Signer {
	t.Helper()
	var k crypto.Signer
	var err error
	switch kind {
	case "p256":
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "p384":
		k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "ed25519":
		_, k, err = ed25519.GenerateKey(rand.Reader)
	case "rsa1024":
		k, err = rsa.GenerateKey(rand.Reader, 1024)
	case "rsa2048":
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	}
	if err != nil || k == nil {
		t.Fatalf("key %s: %v", kind, err)
	}
	return k
}

// TestPolicyRefusesCSRs runs one simulated node per case whose gencsr
// reply the policy refuses (or, for the controls, accepts). A refused node
// fails at gencsr with the reason on its status; the helper never sees it
// and nothing is configured.
func TestPolicyRefusesCSRs(t *testing.T) {
	cases := []struct {
		name   string
		policy func(*Policy)
		csr    func(t *testing.T) func(string) (crypto.Signer, []byte, error)
		reason string // "" = provisioned
		msg    string
	}{
		{
			name: "forbidden DNS SAN",
			csr: func(t *testing.T) func(string) (crypto.Signer, []byte, error) {
				return csrWith(mustKey(t, "p256"), []string{"login.bank.example"}, nil, nil)
			},
			reason: rejectSAN, msg: `DNS SAN "login.bank.example"`,
		},
		{
			name:   "forbidden IP SAN",
			policy: func(p *Policy) { p.SANAllow = append(p.SANAllow, "10.0.0.0/8") },
			csr: func(t *testing.T) func(string) (crypto.Signer, []byte, error) {
				return csrWith(mustKey(t, "p256"), nil, []net.IP{net.ParseIP("192.0.2.1")}, nil)
			},
			reason: rejectSAN, msg: "IP SAN 192.0.2.1",
		},
		{
			name: "forbidden URI SAN",
			csr: func(t *testing.T) func(string) (crypto.Signer, []byte, error) {
				return csrWith(mustKey(t, "p256"), nil, nil, []string{"spiffe://example.net/admin"})
			},
			reason: rejectSAN, msg: "URI SAN",
		},
		{
			name:   "allowed IP and wildcard SANs (control)",
			policy: func(p *Policy) { p.SANAllow = append(p.SANAllow, "10.0.0.0/8", "*.mgmt.example.net") },
			csr: func(t *testing.T) func(string) (crypto.Signer, []byte, error) {
				return csrWith(mustKey(t, "p256"), []string{"n1.mgmt.example.net"}, []net.IP{net.ParseIP("10.9.8.7")}, nil)
			},
		},
		{
			name: "weak RSA key",
			csr: func(t *testing.T) func(string) (crypto.Signer, []byte, error) {
				return csrWith(mustKey(t, "rsa1024"), nil, nil, nil)
			},
			reason: rejectKey, msg: "RSA key of 1024 bits",
		},
		{
			name: "RSA 2048 (control)",
			csr: func(t *testing.T) func(string) (crypto.Signer, []byte, error) {
				return csrWith(mustKey(t, "rsa2048"), nil, nil, nil)
			},
			reason: "",
		},
		{
			name:   "key type outside policy",
			policy: func(p *Policy) { p.KeyTypes = []string{PolicyKeyECDSAP256} },
			csr: func(t *testing.T) func(string) (crypto.Signer, []byte, error) {
				return csrWith(mustKey(t, "ed25519"), nil, nil, nil)
			},
			reason: rejectKey, msg: "key type ed25519",
		},
		{
			name: "P-384 (control)",
			csr: func(t *testing.T) func(string) (crypto.Signer, []byte, error) {
				return csrWith(mustKey(t, "p384"), nil, nil, nil)
			},
			reason: "",
		},
		{
			name: "CSR for another identity",
			csr: func(t *testing.T) func(string) (crypto.Signer, []byte, error) {
				inner := csrWith(mustKey(t, "p256"), nil, nil, nil)
				return func(string) (crypto.Signer, []byte, error) { return inner("node2.example.net") }
			},
			reason: rejectCSR, msg: `CN "node2.example.net" is not the identity`,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			url := startServer(t)
			c := newCA(t)
			fleet := newSimFleet(t, url, c.CertificatePEM())
			node := fleet.add("node1.example.net", nil)
			node.makeCSR = tc.csr(t)
			h := newTestHelper(c, nil)
			cfg := testConfig()
			if tc.policy != nil {
				tc.policy(&cfg.Policy)
			}
			r := startProvisioner(t, url, cfg, h, newObserved(), nil)
			if tc.reason == "" {
				waitProvisioned(t, caseEnv{p: r.p, node: node})
				r.stop(t)
				return
			}
			waitFor(t, 10*time.Second, "policy rejection", func() bool {
				return testutil.ToFloat64(r.p.m.policyRejections.WithLabelValues(tc.reason)) >= 1
			})
			waitFor(t, 10*time.Second, "failed status", func() bool {
				st, _ := nodeState(r.p, node.id)
				return st.State == StateFailed || st.Attempts > 1
			})
			r.stop(t)
			st, _ := nodeState(r.p, node.id)
			if st.Stage != StageGenCSR || !strings.Contains(st.LastError, tc.msg) || !strings.Contains(st.LastError, "refused by provisioner policy: "+tc.reason) {
				t.Errorf("status %+v, want gencsr failure naming %q", st, tc.msg)
			}
			if n := h.callCount(node.id); n != 0 {
				t.Errorf("helper ran %d times for a refused CSR", n)
			}
			if n := node.count(protocol.ActionConfigure); n != 0 {
				t.Errorf("%d configure requests", n)
			}
			for _, other := range rejectReasons {
				if other != tc.reason && testutil.ToFloat64(r.p.m.policyRejections.WithLabelValues(other)) != 0 {
					t.Errorf("policy_rejections_total{reason=%q} counted too", other)
				}
			}
		})
	}
}

// TestPolicyRefusesCertificates checks the helper's certificate against the
// node's key, and against policy.ca_file when set.
func TestPolicyRefusesCertificates(t *testing.T) {
	const id = "node1.example.net"
	cases := []struct {
		name   string
		caFile bool
		sign   func(t *testing.T, good, rogue *ca.CA, req *helper.Request) (*helper.Reply, error)
		reason string
		msg    string
	}{
		{
			name: "certificate for another key",
			sign: func(t *testing.T, good, _ *ca.CA, req *helper.Request) (*helper.Reply, error) {
				_, csr, err := csrWith(mustKey(t, "p256"), nil, nil, nil)(req.Identity)
				if err != nil {
					return nil, err
				}
				return newTestHelper(good, nil).sign(req, csr)
			},
			reason: rejectCertKey, msg: "does not match the key",
		},
		{
			name:   "certificate from another CA with ca_file",
			caFile: true,
			sign: func(_ *testing.T, _, rogue *ca.CA, req *helper.Request) (*helper.Reply, error) {
				// A consistent reply from a rogue CA: its certificate and
				// its own CA, which the helper contract alone accepts.
				return newTestHelper(rogue, nil).sign(req, []byte(req.CSR.CSR))
			},
			reason: rejectCertChain, msg: "policy.ca_file",
		},
		{
			name:   "certificate from the configured CA (control)",
			caFile: true,
			sign: func(_ *testing.T, good, _ *ca.CA, req *helper.Request) (*helper.Reply, error) {
				return newTestHelper(good, nil).sign(req, []byte(req.CSR.CSR))
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			url := startServer(t)
			good, rogue := newCA(t), newCA(t)
			// The node trusts neither CA for this test: what is checked
			// is that the provisioner never sends a refused certificate.
			fleet := newSimFleet(t, url, good.CertificatePEM())
			node := fleet.add(id, nil)
			h := newTestHelper(good, func(req *helper.Request, _ int) (*helper.Reply, error, bool) {
				rep, err := tc.sign(t, good, rogue, req)
				return rep, err, true
			})
			cfg := testConfig()
			if tc.caFile {
				cfg.Policy.CAFile = filepath.Join(t.TempDir(), "ca.pem")
				if err := os.WriteFile(cfg.Policy.CAFile, good.CertificatePEM(), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			r := startProvisioner(t, url, cfg, h, newObserved(), nil)
			if tc.reason == "" {
				waitProvisioned(t, caseEnv{p: r.p, node: node})
				r.stop(t)
				rec, ok, _ := r.p.reg.Get(id)
				if !ok || rec.Serial == "" || !validFingerprint(rec.KeyFingerprint) {
					t.Errorf("registry record %+v", rec)
				}
				return
			}
			waitFor(t, 10*time.Second, "certificate rejection", func() bool {
				return testutil.ToFloat64(r.p.m.policyRejections.WithLabelValues(tc.reason)) >= 1
			})
			r.stop(t)
			st, _ := nodeState(r.p, id)
			if st.Stage != StageValidate || !strings.Contains(st.LastError, tc.msg) || !strings.Contains(st.LastError, "refused by provisioner policy: "+tc.reason) {
				t.Errorf("status %+v, want validate failure naming %q", st, tc.msg)
			}
			if n := node.count(protocol.ActionConfigure); n != 0 {
				t.Errorf("%d configure requests: a refused certificate was sent", n)
			}
			if _, ok, _ := r.p.reg.Get(id); ok {
				t.Error("a refused node was recorded in the registry")
			}
		})
	}
}

// FuzzCheckNodeCSR feeds arbitrary gencsr replies (untrusted node input)
// through the CSR checks and the default policy: nothing panics, and what
// is accepted names only the identity.
func FuzzCheckNodeCSR(f *testing.F) {
	const id = "node1.example.net"
	g, err := newGuard(DefaultConfig().Policy)
	if err != nil {
		f.Fatal(err)
	}
	for _, kind := range []string{"p256", "ed25519"} {
		var key crypto.Signer
		var kerr error
		switch kind {
		case "p256":
			key, kerr = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		default:
			_, key, kerr = ed25519.GenerateKey(rand.Reader)
		}
		if kerr != nil {
			f.Fatal(kerr)
		}
		_, csr, err := csrWith(key, []string{"evil.example.com"}, nil, nil)(id)
		if err != nil {
			f.Fatal(err)
		}
		der, _ := x509.MarshalPKIXPublicKey(key.Public())
		pub := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
		f.Add(string(csr), string(pub))
		_, good, _ := csrWith(key, nil, nil, nil)(id)
		f.Add(string(good), string(pub))
	}
	f.Add("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "")
	f.Fuzz(func(t *testing.T, csrPEM, pubPEM string) {
		csr, pub, err := checkCSR(id, &protocol.GenCSRReply{CSR: csrPEM, PublicKey: pubPEM})
		if err != nil {
			return
		}
		if csr.Subject.CommonName != id || pub == nil {
			t.Fatalf("accepted CN %q", csr.Subject.CommonName)
		}
		if g.checkKey(pub) != nil || g.checkSANs(csr, id) != nil {
			return
		}
		for _, d := range csr.DNSNames {
			if !strings.EqualFold(d, id) {
				t.Fatalf("default policy accepted DNS SAN %q", d)
			}
		}
		if len(csr.IPAddresses)+len(csr.URIs)+len(csr.EmailAddresses) > 0 {
			t.Fatal("default policy accepted a non-DNS SAN")
		}
	})
}
