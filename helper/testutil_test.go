package helper_test

import (
	"crypto"
	"os"
	"path/filepath"
	"testing"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
)

// newCA makes a real CA in a temporary directory and returns it and the
// directory.
func newCA(t testing.TB) (*ca.CA, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	c, err := ca.Init(dir, "Test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	return c, dir
}

// newCSR makes a key and a PEM CSR for identity.
func newCSR(t testing.TB, identity string) (crypto.Signer, string) {
	t.Helper()
	key, err := pki.GenerateKey("", 0)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.CreateCSR(key, identity, pki.CSRSubject{})
	if err != nil {
		t.Fatal(err)
	}
	return key, string(csr)
}

// writeScript writes an executable /bin/sh script into dir.
func writeScript(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}
