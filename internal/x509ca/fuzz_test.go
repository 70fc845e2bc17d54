package x509ca

import (
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/pki"
)

// FuzzSignCSR feeds untrusted CSR input to the signer: it must never panic,
// must fail with a wrapped CSR or PEM error (or ErrCARequest), and whatever
// it signs must verify against the CA, carry the requested name and be a
// leaf.
func FuzzSignCSR(f *testing.F) {
	key := p256(f)
	certPEM, keyPEM := testCA(f, key, true)
	c, err := New(certPEM, keyPEM, 0)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(testCSR(f, "node1.example.net"))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"))
	bc, _ := asn1.Marshal(struct {
		IsCA bool `asn1:"optional"`
	}{true})
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:         pkix.Name{CommonName: "ca.example.net"},
		ExtraExtensions: []pkix.Extension{{Id: oidBasicConstraints, Value: bc}},
	}, key)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	f.Fuzz(func(t *testing.T, csr []byte) {
		p, err := c.SignCSR(csr, []string{"fuzz.example.net"})
		if err != nil {
			if !errors.Is(err, pki.ErrBadCSR) && !errors.Is(err, pki.ErrBadPEM) && !errors.Is(err, ErrCARequest) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		leaf, err := pki.VerifyLeaf(p, certPEM, nil, "fuzz.example.net", time.Now())
		if err != nil {
			t.Fatalf("signed certificate does not verify: %v", err)
		}
		if leaf.IsCA || len(leaf.DNSNames) != 1 {
			t.Fatalf("certificate CA=%t names %v", leaf.IsCA, leaf.DNSNames)
		}
	})
}
