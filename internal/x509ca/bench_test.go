package x509ca

import "testing"

// BenchmarkSignCSR is the signing the muster-helper binary does per node:
// CSR form and signature check, template, ECDSA P-256 signature (and
// crypto/x509's check of it). Compare ca.BenchmarkSignCSR (cfssl).
func BenchmarkSignCSR(b *testing.B) {
	certPEM, keyPEM := testCA(b, p256(b), true)
	c, err := New(certPEM, keyPEM, 0)
	if err != nil {
		b.Fatal(err)
	}
	csr := testCSR(b, "node1.example.net")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.SignCSR(csr, []string{"node1.example.net"}); err != nil {
			b.Fatal(err)
		}
	}
}
