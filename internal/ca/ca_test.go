package ca

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/pki"
)

func TestInitSignVerify(t *testing.T) {
	dir := t.TempDir()
	c, err := Init(dir, "Test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("ca key mode %v, want 0600", st.Mode().Perm())
	}
	if _, err := Init(dir, "again", 0); !errors.Is(err, ErrExists) {
		t.Fatalf("second init: %v, want ErrExists", err)
	}
	loaded, err := LoadDir(dir, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if loaded.Pin() != c.Pin() {
		t.Fatal("pin changed across load")
	}

	key, err := pki.GenerateKey("", 0)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.CreateCSR(key, "node1.example.net", pki.CSRSubject{})
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := loaded.SignCSR(csr, nil)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := pki.VerifyLeaf(certPEM, loaded.CertificatePEM(), key.Public(), "node1.example.net", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if leaf.NotAfter.Sub(leaf.NotBefore) > 2*time.Hour {
		t.Fatalf("leaf validity %v ignores the configured hour", leaf.NotAfter.Sub(leaf.NotBefore))
	}
	other, _ := pki.GenerateKey("", 0)
	if _, err := pki.VerifyLeaf(certPEM, loaded.CertificatePEM(), other.Public(), "node1.example.net", time.Now()); !errors.Is(err, pki.ErrKeyMismatch) {
		t.Fatalf("other key: %v", err)
	}
	if _, err := pki.VerifyLeaf(certPEM, loaded.CertificatePEM(), key.Public(), "node2.example.net", time.Now()); !errors.Is(err, pki.ErrIdentityMismatch) {
		t.Fatalf("other identity: %v", err)
	}
	c2, err := Init(t.TempDir(), "Other CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pki.VerifyLeaf(certPEM, c2.CertificatePEM(), key.Public(), "node1.example.net", time.Now()); !errors.Is(err, pki.ErrUntrusted) {
		t.Fatalf("other ca: %v", err)
	}

	is, err := loaded.Issue("broker.local", []string{"localhost", "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	cf, kf, err := loaded.WriteIssued(t.TempDir(), "broker", is)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(kf); st.Mode().Perm() != 0o600 {
		t.Fatalf("issued key mode %v", st.Mode().Perm())
	}
	chain, _ := os.ReadFile(cf)
	certs, err := pki.ParseCertificates(chain)
	if err != nil || len(certs) != 2 {
		t.Fatalf("chain: %d certs, %v", len(certs), err)
	}
	if len(certs[0].IPAddresses) != 1 || certs[0].DNSNames[0] != "localhost" {
		t.Fatalf("sans: %v %v", certs[0].DNSNames, certs[0].IPAddresses)
	}
}
