package builtin_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/helper/builtin"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/x509ca"
)

const id = "node1.example.net"

// newCA makes a CA the way "muster ca init" does (cfssl) and loads it with
// the crypto/x509 signer, the pair muster-helper runs with. The cfssl
// signer is tested with this helper in helper/cfsslhelper.
func newCA(t testing.TB) (*x509ca.CA, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := ca.Init(dir, "Test CA", 0); err != nil {
		t.Fatal(err)
	}
	c, err := x509ca.LoadDir(dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	return c, dir
}

// loadX509 is the LoadSigner of muster-helper.
func loadX509(cert, key string, validity time.Duration) (builtin.Signer, error) {
	return x509ca.Load(cert, key, validity)
}

func newCSR(t *testing.T, cn string) string {
	t.Helper()
	key, err := pki.GenerateKey("", 0)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.CreateCSR(key, cn, pki.CSRSubject{})
	if err != nil {
		t.Fatal(err)
	}
	return string(csr)
}

func request(t *testing.T, facts map[string]string, csr string) *helper.Request {
	t.Helper()
	inv, err := json.Marshal(map[string]any{"facts": facts, "collectives": []string{"provisioning"}})
	if err != nil {
		t.Fatal(err)
	}
	req := &helper.Request{Identity: id, Inventory: string(inv)}
	if csr != "" {
		req.CSR = &helper.CSRInfo{CSR: csr, SSLDir: "/var/lib/muster/ssl"}
	}
	return req
}

func TestProvision(t *testing.T) {
	c, _ := newCA(t)
	cfg := &builtin.Config{
		MiddlewareHosts: "broker.example.net:4222",
		Defaults: map[string]string{
			"loglevel": "info",
			"plugin.choria.registration.file_content.data": "{{ssldir}}/../registration/{{identity}}.json",
		},
		Rules: []builtin.Rule{
			{Name: "malta", Facts: map[string]string{"country": "mt"}, Set: map[string]string{"plugin.choria.middleware_hosts": "choria1.mt.example.net:4223"}},
			{Name: "dc", Facts: map[string]string{"dc": "*"}, Set: map[string]string{"collectives": "mcollective,{{fact:dc}}"}},
			{Name: "canary", Facts: map[string]string{"role": "canary*", "country": "mt"}, Set: map[string]string{"loglevel": "debug"}},
		},
	}
	h, err := builtin.New(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		facts  map[string]string
		csr    bool
		want   map[string]string
		absent []string
	}{
		{
			name:  "country mt gets the Maltese broker",
			facts: map[string]string{"country": "mt"},
			csr:   true,
			want: map[string]string{
				"identity":                         id,
				"plugin.choria.middleware_hosts":   "choria1.mt.example.net:4223",
				"plugin.security.provider":         "file",
				"plugin.security.file.certificate": "/var/lib/muster/ssl/certificate.pem",
				"plugin.security.file.key":         "/var/lib/muster/ssl/private.pem",
				"plugin.security.file.ca":          "/var/lib/muster/ssl/ca.pem",
				"plugin.choria.server.provision":   "false",
				"loglevel":                         "info",
			},
			absent: []string{"collectives"},
		},
		{
			name:  "other countries get the default broker",
			facts: map[string]string{"country": "de"},
			csr:   true,
			want:  map[string]string{"plugin.choria.middleware_hosts": "broker.example.net:4222"},
		},
		{
			name:  "placeholders",
			facts: map[string]string{"dc": "fra1"},
			csr:   true,
			want: map[string]string{
				"collectives": "mcollective,fra1",
				"plugin.choria.registration.file_content.data": "/var/lib/muster/ssl/../registration/node1.example.net.json",
			},
		},
		{
			name:  "later rules override",
			facts: map[string]string{"country": "mt", "role": "canary-1"},
			csr:   true,
			want:  map[string]string{"loglevel": "debug"},
		},
		{
			name:  "no CSR uses the configured ssldir and signs nothing",
			facts: map[string]string{},
			want:  map[string]string{"plugin.security.file.key": "/etc/muster/ssl/private.pem"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var csr string
			if tc.csr {
				csr = newCSR(t, id)
			}
			req := request(t, tc.facts, csr)
			rep, err := h.Provision(context.Background(), req)
			if err != nil {
				t.Fatal(err)
			}
			if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
				t.Fatalf("the helper's own reply is invalid: %v", err)
			}
			for k, v := range tc.want {
				if rep.Configuration[k] != v {
					t.Errorf("%s = %q, want %q", k, rep.Configuration[k], v)
				}
			}
			for _, k := range tc.absent {
				if _, ok := rep.Configuration[k]; ok {
					t.Errorf("%s set to %q", k, rep.Configuration[k])
				}
			}
			if tc.csr {
				if _, err := pki.VerifyLeaf([]byte(rep.Certificate), c.CertificatePEM(), nil, id, time.Now()); err != nil {
					t.Errorf("signed certificate: %v", err)
				}
				if rep.CA != string(c.CertificatePEM()) || rep.SSLDir != "/var/lib/muster/ssl" {
					t.Errorf("ca/ssldir: %q", rep.SSLDir)
				}
			} else if rep.Certificate != "" {
				t.Error("certificate without a CSR")
			}
		})
	}
}

func TestProvisionDefersAndRefuses(t *testing.T) {
	c, _ := newCA(t)
	cases := []struct {
		name      string
		cfg       builtin.Config
		req       func(t *testing.T) *helper.Request
		wantDefer string
		wantErr   error
	}{
		{
			name:      "defer without middleware hosts",
			cfg:       builtin.Config{},
			req:       func(t *testing.T) *helper.Request { return request(t, nil, newCSR(t, id)) },
			wantDefer: "plugin.choria.middleware_hosts",
		},
		{
			name: "hosts from a rule only",
			cfg: builtin.Config{Rules: []builtin.Rule{{Name: "mt", Facts: map[string]string{"country": "mt"},
				Set: map[string]string{"plugin.choria.middleware_hosts": "mt:4222"}}}},
			req:       func(t *testing.T) *helper.Request { return request(t, map[string]string{"country": "de"}, "") },
			wantDefer: "plugin.choria.middleware_hosts",
		},
		{
			name:      "defer_unless missing fact",
			cfg:       builtin.Config{MiddlewareHosts: "b:1", DeferUnless: map[string]string{"country": "??"}},
			req:       func(t *testing.T) *helper.Request { return request(t, map[string]string{"role": "web"}, "") },
			wantDefer: "fact country is missing",
		},
		{
			name:      "defer_unless glob mismatch",
			cfg:       builtin.Config{MiddlewareHosts: "b:1", DeferUnless: map[string]string{"country": "??"}},
			req:       func(t *testing.T) *helper.Request { return request(t, map[string]string{"country": "mlt"}, "") },
			wantDefer: "does not match",
		},
		{
			name:      "placeholder fact missing",
			cfg:       builtin.Config{MiddlewareHosts: "b:1", Defaults: map[string]string{"collectives": "{{fact:dc}}"}},
			req:       func(t *testing.T) *helper.Request { return request(t, nil, "") },
			wantDefer: `missing fact "dc"`,
		},
		{
			name:    "CSR with a mismatched CN",
			cfg:     builtin.Config{MiddlewareHosts: "b:1"},
			req:     func(t *testing.T) *helper.Request { return request(t, nil, newCSR(t, "evil.example.net")) },
			wantErr: builtin.ErrCNMismatch,
		},
		{
			name: "garbage CSR",
			cfg:  builtin.Config{MiddlewareHosts: "b:1"},
			req: func(t *testing.T) *helper.Request {
				return request(t, nil, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
			},
			wantErr: builtin.ErrBadRequest,
		},
		{
			name: "relative ssldir",
			cfg:  builtin.Config{MiddlewareHosts: "b:1"},
			req: func(t *testing.T) *helper.Request {
				r := request(t, nil, newCSR(t, id))
				r.CSR.SSLDir = "ssl"
				return r
			},
			wantErr: builtin.ErrBadRequest,
		},
		{
			name: "inventory that is not JSON",
			cfg:  builtin.Config{MiddlewareHosts: "b:1"},
			req: func(t *testing.T) *helper.Request {
				return &helper.Request{Identity: id, Inventory: "{not json"}
			},
			wantErr: builtin.ErrBadRequest,
		},
		{
			name: "fact with a newline cannot inject configuration",
			cfg:  builtin.Config{MiddlewareHosts: "b:1", Defaults: map[string]string{"collectives": "{{fact:dc}}"}},
			req: func(t *testing.T) *helper.Request {
				return request(t, map[string]string{"dc": "x\nplugin.choria.server.provision = true"}, "")
			},
			wantErr: errors.New("newline"),
		},
		{
			name:    "empty identity",
			cfg:     builtin.Config{MiddlewareHosts: "b:1"},
			req:     func(*testing.T) *helper.Request { return &helper.Request{} },
			wantErr: builtin.ErrBadRequest,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			h, err := builtin.New(c, &cfg)
			if err != nil {
				t.Fatal(err)
			}
			rep, err := h.Provision(context.Background(), tc.req(t))
			if tc.wantErr != nil {
				if err == nil {
					t.Fatalf("no error, reply %+v", rep)
				}
				if !errors.Is(err, tc.wantErr) && !strings.Contains(err.Error(), tc.wantErr.Error()) {
					t.Fatalf("error = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !rep.Defer || !strings.Contains(rep.Msg, tc.wantDefer) || len(rep.Configuration) != 0 {
				t.Fatalf("reply %+v, want a defer mentioning %q", rep, tc.wantDefer)
			}
		})
	}
}

func TestNewFromFiles(t *testing.T) {
	_, dir := newCA(t)
	h, err := builtin.NewFromFiles(&builtin.Config{
		CA:              builtin.CAFiles{Cert: filepath.Join(dir, x509ca.CertFile), Key: filepath.Join(dir, x509ca.KeyFile)},
		Validity:        "24h",
		MiddlewareHosts: "b:4222",
	}, loadX509)
	if err != nil {
		t.Fatal(err)
	}
	req := request(t, nil, newCSR(t, id))
	rep, err := h.Provision(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := pki.VerifyLeaf([]byte(rep.Certificate), []byte(rep.CA), nil, id, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if life := leaf.NotAfter.Sub(leaf.NotBefore); life != 24*time.Hour {
		t.Errorf("certificate lives %s, want the configured 24h", life)
	}
	if _, err := builtin.NewFromFiles(&builtin.Config{}, loadX509); !errors.Is(err, builtin.ErrNoCA) {
		t.Errorf("NewFromFiles without a CA: %v", err)
	}
	if _, err := builtin.NewFromFiles(&builtin.Config{CA: builtin.CAFiles{Cert: "/nonexistent/ca.pem", Key: "/nonexistent/k.pem"}}, loadX509); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("NewFromFiles with a missing CA: %v", err)
	}
	if _, err := builtin.NewFromFiles(&builtin.Config{Validity: "soon"}, loadX509); err == nil || !strings.Contains(err.Error(), "validity") {
		t.Errorf("NewFromFiles with a bad config: %v", err)
	}
	if _, err := builtin.New(nil, nil); !errors.Is(err, builtin.ErrNoCA) {
		t.Errorf("New without a signer: %v", err)
	}
}

func TestLoadConfig(t *testing.T) {
	cases := []struct {
		name string
		yaml string
		want []string // substrings of the error; none means valid
	}{
		{name: "empty file", yaml: ""},
		{name: "full", yaml: "ca: {cert: /a/ca.pem, key: /a/ca-key.pem}\nvalidity: 720h\nmiddleware_hosts: b:4222\nssldir: /srv/ssl\n" +
			"defaults: {loglevel: info}\nrules:\n  - name: mt\n    facts: {country: mt}\n    set: {plugin.choria.middleware_hosts: 'x:1'}\ndefer_unless: {country: '*'}\n"},
		{name: "unknown key", yaml: "middleware_host: b:4222\n", want: []string{"middleware_host"}},
		{name: "unknown nested key", yaml: "ca: {certificate: /a}\n", want: []string{"certificate"}},
		{
			name: "every problem reported",
			yaml: "validity: forever\nca: {cert: /a}\nssldir: rel\ndefaults: {'bad key': x, identity: y, ok: '{{nope}}'}\n" +
				"rules:\n  - facts: {country: '[mt'}\n    set: {a: b}\n  - name: dup\n    set: {a: b}\n  - name: dup\n",
			want: []string{`validity "forever"`, "ca: cert", `ssldir "rel"`, "bad key", "identity", "{{nope}}", "rules[0].name: empty", "bad glob", `rules[2].name "dup": duplicate`, "rules[2] (dup).set: empty"},
		},
		{name: "unterminated placeholder", yaml: "defaults: {a: '{{identity'}\n", want: []string{"unterminated"}},
		{name: "empty fact placeholder", yaml: "defaults: {a: '{{fact:}}'}\n", want: []string{"empty fact name"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "helper.yaml")
			if err := os.WriteFile(p, []byte(tc.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg, err := builtin.LoadConfig(p)
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				if cfg.Validity == "" || cfg.SSLDir == "" {
					t.Errorf("defaults not applied: %+v", cfg)
				}
				return
			}
			if err == nil {
				t.Fatal("invalid config accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
}

func TestExampleConfig(t *testing.T) {
	cfg, err := builtin.LoadConfig(filepath.Join("..", "..", "examples", "helper-cfssl.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	c, _ := newCA(t)
	h, err := builtin.New(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	req := request(t, map[string]string{"country": "mt", "dc": "mla1"}, newCSR(t, id))
	rep, err := h.Provision(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
		t.Fatal(err)
	}
	if got := rep.Configuration["plugin.choria.middleware_hosts"]; got != "choria1.mt.example.net:4223" {
		t.Errorf("middleware_hosts = %q", got)
	}
	if got := rep.Configuration["collectives"]; got != "mcollective,mla1" {
		t.Errorf("collectives = %q", got)
	}
	rep, err = h.Provision(context.Background(), request(t, map[string]string{}, ""))
	if err != nil || !rep.Defer {
		t.Errorf("node without country: %+v %v", rep, err)
	}
}
