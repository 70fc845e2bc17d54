package provisioner

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaultConfig(t *testing.T) {
	c := DefaultConfig()
	checks := []struct {
		name string
		ok   bool
	}{
		{"workers", c.Workers == 8},
		{"interval", c.Interval.D() == time.Minute},
		{"helper_mode", c.HelperMode == "exec"},
		{"helper_timeout", c.HelperTimeout.D() == 10*time.Second},
		{"helper_concurrency", c.helperConcurrency() == 8},
		{"monitor_host", c.MonitorHost == "127.0.0.1"},
		{"pki", c.Features.PKI},
		{"key_type", c.KeyType == "ecdsa-p256"},
		{"queue_size", c.QueueSize == 10000},
		{"rpc_timeout", c.RPCTimeout.D() == 10*time.Second},
		{"rpc_retries", c.RPCRetries == 3},
		{"defer_backoff", c.DeferBackoff.D() == 30*time.Second},
		{"grace", c.Grace.D() == 2*time.Minute},
		{"restart_splay", c.RestartSplay.D() == 2*time.Second},
		{"name", strings.HasPrefix(c.Name, "muster-provisioner@")},
	}
	for _, ch := range checks {
		if !ch.ok {
			t.Errorf("default %s wrong: %+v", ch.name, c)
		}
	}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "brokers") {
		t.Errorf("default config without brokers: %v", err)
	}
	c.Brokers = []string{"tls://127.0.0.1:4222"}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "nkey_seed_file") || !strings.Contains(err.Error(), "token_issuers") {
		t.Errorf("default config without signing key and token issuers: %v", err)
	}
	c.NkeySeedFile = testSeedFile
	c.TokenIssuers = []string{testIssuer.PublicKey()}
	if err := c.Validate(); err != nil {
		t.Errorf("default config with a broker, a key and an issuer: %v", err)
	}
}

func TestLoadConfig(t *testing.T) {
	seed := writeFile(t, "p.nk", "SUAxxx")
	// trust is what every loadable configuration needs: a signing key and
	// a token issuer.
	trust := "nkey_seed_file: " + seed + "\ntoken_issuers: [" + testIssuer.PublicKey() + "]\n"
	good := `
workers: 3
interval: 30s
helper: "/usr/local/bin/helper --flag"
helper_timeout: 5s
helper_concurrency: 2
token_issuers: [` + testIssuer.PublicKey() + `]
site: lab
monitor_port: 9300
brokers: ["tls://broker1:4222", "nats://broker2:4222"]
nkey_seed_file: ` + seed + `
features: {pki: false}
key_type: rsa
queue_size: 50
rpc_timeout: 2s
rpc_retries: 1
defer_backoff: 1m
grace: 10m
restart_splay: 500ms
loglevel: debug
name: prov1
`
	cases := []struct {
		name    string
		content string
		wantErr []string
		check   func(t *testing.T, c Config)
	}{
		{name: "full", content: good, check: func(t *testing.T, c Config) {
			if c.Workers != 3 || c.Interval.D() != 30*time.Second || c.HelperConcurrency != 2 || c.Features.PKI ||
				c.KeyType != "rsa" || c.QueueSize != 50 || c.RestartSplay.D() != 500*time.Millisecond || len(c.Brokers) != 2 || c.Name != "prov1" {
				t.Errorf("loaded %+v", c)
			}
		}},
		{name: "defaults kept", content: trust + "brokers: [tls://b:4222]\n", check: func(t *testing.T, c Config) {
			if !c.Features.PKI || c.Workers != 8 || c.Grace.D() != 2*time.Minute || c.HelperMode != "exec" {
				t.Errorf("defaults lost: %+v", c)
			}
		}},
		{name: "unknown key", content: "brokers: [tls://b:4222]\nwokers: 3\n", wantErr: []string{"wokers"}},
		{name: "unknown nested key", content: "brokers: [tls://b:4222]\nfeatures: {pkki: true}\n", wantErr: []string{"pkki"}},
		{name: "bad duration", content: "brokers: [tls://b:4222]\ninterval: soon\n", wantErr: []string{"soon"}},
		{name: "empty file", content: "", wantErr: []string{"brokers"}},
		{name: "persistent helper", content: trust + "brokers: [tls://b:4222]\nhelper: ./h.py --persistent\nhelper_mode: persistent\n", check: func(t *testing.T, c Config) {
			if c.HelperMode != "persistent" || c.Helper != "./h.py --persistent" {
				t.Errorf("loaded %+v", c)
			}
		}},
		{name: "exec mode spelled out", content: trust + "brokers: [tls://b:4222]\nhelper_mode: exec\n", check: func(t *testing.T, c Config) {
			if c.HelperMode != "exec" {
				t.Errorf("loaded %+v", c)
			}
		}},
		{name: "persistent without a helper", content: "brokers: [tls://b:4222]\nhelper_mode: persistent\n", wantErr: []string{"helper_mode persistent"}},
		{name: "every error", content: `
workers: 0
interval: 10ms
helper: x
helper_config: y.yaml
helper_timeout: 0s
helper_concurrency: -1
helper_mode: forking
monitor_port: 70000
brokers: ["http://b:80", "::bad"]
tls_ca: /nonexistent/ca.pem
nkey_seed_file: /nonexistent/p.nk
key_type: dsa
queue_size: 0
rpc_timeout: 1h
rpc_retries: -1
defer_backoff: 0s
grace: -1s
restart_splay: 2h
loglevel: chatty
name: ""
token_issuers: [UNOTANISSUER]
`, wantErr: []string{
			"token_issuers",
			"workers 0", "interval 10ms", "helper_config", "helper_timeout 0s", "helper_concurrency -1",
			"helper_mode forking", "monitor_port 70000", "brokers[0]", "brokers[1]", "tls_ca", "nkey_seed_file", "key_type \"dsa\"",
			"queue_size 0", "rpc_timeout 1h0m0s", "rpc_retries -1", "defer_backoff 0s", "grace -1s",
			"restart_splay 2h0m0s", "loglevel \"chatty\"", "name \"\"",
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := LoadConfig(writeFile(t, "p.yaml", tc.content))
			if len(tc.wantErr) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				tc.check(t, c)
				return
			}
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if !errors.Is(err, ErrConfig) {
				t.Errorf("error is not ErrConfig: %v", err)
			}
		})
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Error("missing file loaded")
	}
}

func TestConfigSecretsNotInErrors(t *testing.T) {
	c := DefaultConfig()
	c.Brokers = []string{"nats://user:hunter2@b:4222"}
	err := c.Validate()
	if err == nil || strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "SUA") {
		t.Fatalf("Validate = %v", err)
	}
}

func FuzzLoadConfig(f *testing.F) {
	f.Add("workers: 3\nbrokers: [tls://b:4222]\n")
	f.Add("interval: 1x\n")
	f.Add("features: [1]\n")
	f.Fuzz(func(t *testing.T, content string) {
		p := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := LoadConfig(p)
		if err == nil {
			if verr := c.Validate(); verr != nil {
				t.Fatalf("LoadConfig accepted an invalid config: %v", verr)
			}
		}
	})
}
