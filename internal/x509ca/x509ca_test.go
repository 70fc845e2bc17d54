package x509ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/pki"
)

// testCA makes a CA certificate and key (PEM) with crypto/x509.
func testCA(t testing.TB, key crypto.Signer, isCA bool) (certPEM, keyPEM []byte) {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "Test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  isCA,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err = pki.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM
}

func p256(t testing.TB) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func testCSR(t testing.TB, cn string) []byte {
	t.Helper()
	csr, err := pki.CreateCSR(p256(t), cn, pki.CSRSubject{})
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

func TestNewRefuses(t *testing.T) {
	key := p256(t)
	certPEM, keyPEM := testCA(t, key, true)
	_, otherKeyPEM := testCA(t, p256(t), true)
	leafPEM, leafKeyPEM := testCA(t, key, false)
	weak, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	weakPEM, weakKeyPEM := testCA(t, weak, true)
	cases := []struct {
		name     string
		cert, k  []byte
		validity time.Duration
		want     error
	}{
		{"key of another CA", certPEM, otherKeyPEM, 0, pki.ErrKeyMismatch},
		{"not a CA", leafPEM, leafKeyPEM, 0, ErrNotCA},
		{"RSA 1024 CA", weakPEM, weakKeyPEM, 0, pki.ErrKeyPolicy},
		{"garbage certificate", []byte("nope"), keyPEM, 0, pki.ErrBadPEM},
		{"garbage key", certPEM, []byte("nope"), 0, pki.ErrBadPEM},
		{"negative validity", certPEM, keyPEM, -time.Hour, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cert, tc.k, tc.validity)
			if err == nil {
				t.Fatal("accepted")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
		})
	}
	c, err := New(certPEM, keyPEM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if c.Validity() != DefaultLeafValidity || string(c.CertificatePEM()) != string(certPEM) || c.Certificate().Subject.CommonName != "Test CA" {
		t.Errorf("validity %s, certificate %q", c.Validity(), c.Certificate().Subject.CommonName)
	}
}

func TestLoadDir(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadDir(dir, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("empty dir: %v, want ErrNotFound", err)
	}
	certPEM, keyPEM := testCA(t, p256(t), true)
	if err := os.WriteFile(filepath.Join(dir, KeyFile), keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadDir(dir, 0); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("no certificate: %v, want a missing file", err)
	}
	if err := os.WriteFile(filepath.Join(dir, CertFile), certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := LoadDir(dir, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := c.SignCSR(testCSR(t, "node1.example.net"), []string{"node1.example.net"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pki.VerifyLeaf(cert, certPEM, nil, "node1.example.net", time.Now()); err != nil {
		t.Fatal(err)
	}
}

// TestValidityWindow pins the clock: the start is the signing time rounded
// to the nearest minute, less Backdate; the end is the start plus the leaf
// validity; both in UTC.
func TestValidityWindow(t *testing.T) {
	certPEM, keyPEM := testCA(t, p256(t), true)
	c, err := New(certPEM, keyPEM, 48*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	malta := time.FixedZone("CET", 3600)
	cases := []struct {
		now, notBefore time.Time
	}{
		{time.Date(2026, 11, 25, 12, 2, 20, 0, malta), time.Date(2026, 11, 25, 10, 57, 0, 0, time.UTC)},
		{time.Date(2026, 11, 25, 12, 2, 40, 0, malta), time.Date(2026, 11, 25, 10, 58, 0, 0, time.UTC)},
		{time.Date(2026, 11, 25, 0, 3, 0, 0, time.UTC), time.Date(2026, 11, 24, 23, 58, 0, 0, time.UTC)},
	}
	for _, tc := range cases {
		c.now = func() time.Time { return tc.now }
		p, err := c.SignCSR(testCSR(t, "n.example.net"), nil)
		if err != nil {
			t.Fatal(err)
		}
		certs, err := pki.ParseCertificates(p)
		if err != nil {
			t.Fatal(err)
		}
		leaf := certs[0]
		if !leaf.NotBefore.Equal(tc.notBefore) || !leaf.NotAfter.Equal(tc.notBefore.Add(48*time.Hour)) {
			t.Errorf("signed at %s: valid %s to %s, want from %s for 48h", tc.now, leaf.NotBefore, leaf.NotAfter, tc.notBefore)
		}
	}
}

func TestSignConcurrently(t *testing.T) {
	certPEM, keyPEM := testCA(t, p256(t), true)
	c, err := New(certPEM, keyPEM, 0)
	if err != nil {
		t.Fatal(err)
	}
	csr := testCSR(t, "node1.example.net")
	var wg sync.WaitGroup
	serials := make([]*big.Int, 16)
	errs := make([]error, len(serials))
	for i := range serials {
		wg.Go(func() {
			p, err := c.SignCSR(csr, []string{"node1.example.net"})
			if err != nil {
				errs[i] = err
				return
			}
			certs, err := pki.ParseCertificates(p)
			if err != nil {
				errs[i] = err
				return
			}
			serials[i] = certs[0].SerialNumber
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for i, s := range serials {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if seen[s.String()] {
			t.Fatalf("serial %x issued twice", s)
		}
		seen[s.String()] = true
	}
}
