package agent

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/pki"
)

func TestDecideMode(t *testing.T) {
	const id = "node1.example.net"
	c, _ := newCA(t)
	other, _ := newCA(t)
	certPEM, keyPEM := signedFor(t, c, id)
	_, otherKeyPEM := signedFor(t, c, id)
	otherCACert, otherCAKey := signedFor(t, other, id)
	now := time.Now()

	type files struct {
		cert, key, ca []byte
		cfg           map[string]string // nil: no config file
	}
	complete := func(mut func(f *files)) files {
		f := files{cert: certPEM, key: keyPEM, ca: c.CertificatePEM(), cfg: map[string]string{
			config.KeyMiddlewareHosts: "127.0.0.1:4222",
			config.KeyIdentity:        id,
		}}
		if mut != nil {
			mut(&f)
		}
		return f
	}
	cases := []struct {
		name    string
		f       files
		enabled bool
		at      time.Time
		want    Mode
		wantErr bool
	}{
		{"no config, provisioning enabled", files{}, true, now, ModeProvisioning, false},
		{"no config, provisioning disabled", files{}, false, now, 0, true},
		{"complete", complete(nil), false, now, ModeProduction, false},
		{"complete with provision false", complete(func(f *files) { f.cfg[config.KeyProvision] = "false" }), true, now, ModeProduction, false},
		{"provision true", complete(func(f *files) { f.cfg[config.KeyProvision] = "true" }), false, now, ModeProvisioning, false},
		{"cert expired, provisioning enabled", complete(nil), true, now.Add(3 * 365 * 24 * time.Hour), ModeProvisioning, false},
		{"cert expired, provision false", complete(func(f *files) { f.cfg[config.KeyProvision] = "false" }), true, now.Add(3 * 365 * 24 * time.Hour), 0, true},
		{"cert of another key", complete(func(f *files) { f.key = otherKeyPEM }), true, now, ModeProvisioning, false},
		{"cert of another key, disabled", complete(func(f *files) { f.key = otherKeyPEM }), false, now, 0, true},
		{"wrong CA", complete(func(f *files) { f.cert, f.key = otherCACert, otherCAKey }), true, now, ModeProvisioning, false},
		{"missing middleware_hosts", complete(func(f *files) { delete(f.cfg, config.KeyMiddlewareHosts) }), true, now, ModeProvisioning, false},
		{"other identity configured", complete(func(f *files) { f.cfg[config.KeyIdentity] = "node2" }), true, now, ModeProvisioning, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfgFile := filepath.Join(dir, "agent.cfg")
			if tc.f.cfg != nil {
				paths := map[string][]byte{"cert.pem": tc.f.cert, "key.pem": tc.f.key, "ca.pem": tc.f.ca}
				for name, data := range paths {
					if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
						t.Fatal(err)
					}
				}
				tc.f.cfg[config.KeyCertificate] = filepath.Join(dir, "cert.pem")
				tc.f.cfg[config.KeyKey] = filepath.Join(dir, "key.pem")
				tc.f.cfg[config.KeyCA] = filepath.Join(dir, "ca.pem")
				cfg, err := config.FromMap(tc.f.cfg)
				if err != nil {
					t.Fatal(err)
				}
				if err := cfg.Save(cfgFile); err != nil {
					t.Fatal(err)
				}
			}
			d := DecideMode(id, cfgFile, tc.enabled, tc.at)
			if tc.wantErr {
				if !errors.Is(d.Err, ErrNoMode) {
					t.Fatalf("err = %v, want ErrNoMode (decision %v: %s)", d.Err, d.Mode, d.Reason)
				}
				return
			}
			if d.Err != nil {
				t.Fatalf("unexpected error: %v", d.Err)
			}
			if d.Mode != tc.want {
				t.Fatalf("mode %s (%s), want %s", d.Mode, d.Reason, tc.want)
			}
			if d.Mode == ModeProduction && d.NotAfter.IsZero() {
				t.Fatal("production decision without certificate expiry")
			}
		})
	}
}

// TestDecideModeKnownFiles checks the record of verified files configure
// leaves: the same bytes skip verification inside the window only; any
// change, another identity or a time outside the window verifies again.
func TestDecideModeKnownFiles(t *testing.T) {
	const id = "node1.example.net"
	c, _ := newCA(t)
	certPEM, keyPEM := signedFor(t, c, id)
	_, otherKeyPEM := signedFor(t, c, id)
	now := time.Now()
	key, err := pki.ParsePrivateKey(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	v, err := pki.VerifyChain(certPEM, c.CertificatePEM(), key.Public(), id, now)
	if err != nil {
		t.Fatal(err)
	}
	if v.NotAfter.After(v.Leaf.NotAfter) || v.NotBefore.Before(v.Leaf.NotBefore) {
		t.Fatalf("window %s..%s outside the leaf's %s..%s", v.NotBefore, v.NotAfter, v.Leaf.NotBefore, v.Leaf.NotAfter)
	}
	known := newVerifiedFiles(id, certPEM, c.CertificatePEM(), keyPEM, v)

	dir := t.TempDir()
	write := func(name string, data []byte) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cfgFile := filepath.Join(dir, "agent.cfg")
	cfg, err := config.FromMap(map[string]string{
		config.KeyMiddlewareHosts: "127.0.0.1:4222",
		config.KeyCertificate:     write("cert.pem", certPEM),
		config.KeyKey:             write("key.pem", keyPEM),
		config.KeyCA:              write("ca.pem", c.CertificatePEM()),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Save(cfgFile); err != nil {
		t.Fatal(err)
	}
	if !known.covers(id, certPEM, c.CertificatePEM(), keyPEM, now) {
		t.Fatal("record does not cover the files it was made from")
	}
	for name, ok := range map[string]bool{
		"other identity": known.covers("node2.example.net", certPEM, c.CertificatePEM(), keyPEM, now),
		"other key":      known.covers(id, certPEM, c.CertificatePEM(), otherKeyPEM, now),
		"before window":  known.covers(id, certPEM, c.CertificatePEM(), keyPEM, v.NotBefore.Add(-time.Second)),
		"after window":   known.covers(id, certPEM, c.CertificatePEM(), keyPEM, v.NotAfter.Add(time.Second)),
		"nil record":     (*verifiedFiles)(nil).covers(id, certPEM, c.CertificatePEM(), keyPEM, now),
	} {
		if ok {
			t.Errorf("%s: covered", name)
		}
	}
	if d := decideMode(id, cfgFile, false, now, known); d.Mode != ModeProduction || d.Err != nil || !d.NotAfter.Equal(v.Leaf.NotAfter) {
		t.Fatalf("with the record: mode %s, err %v, not after %s", d.Mode, d.Err, d.NotAfter)
	}
	// A key swapped on disk after configure: verified again, refused.
	write("key.pem", otherKeyPEM)
	if d := decideMode(id, cfgFile, false, now, known); !errors.Is(d.Err, ErrNoMode) {
		t.Fatalf("key swapped: mode %s (%s), err %v; want ErrNoMode", d.Mode, d.Reason, d.Err)
	}
	// Expired: the window is checked even for known files.
	write("key.pem", keyPEM)
	if d := decideMode(id, cfgFile, false, v.NotAfter.Add(time.Hour), known); !errors.Is(d.Err, ErrNoMode) {
		t.Fatalf("expired: mode %s (%s), err %v; want ErrNoMode", d.Mode, d.Reason, d.Err)
	}
}
