package ca

import (
	"testing"

	"github.com/muster-io/muster/internal/pki"
)

func BenchmarkSignCSR(b *testing.B) {
	c, err := Init(b.TempDir(), "Bench CA", 0)
	if err != nil {
		b.Fatal(err)
	}
	key, _ := pki.GenerateKey("", 0)
	csr, _ := pki.CreateCSR(key, "node1.example.net", pki.CSRSubject{})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.SignCSR(csr, []string{"node1.example.net"}); err != nil {
			b.Fatal(err)
		}
	}
}
