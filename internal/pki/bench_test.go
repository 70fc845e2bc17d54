package pki

import (
	"testing"
	"time"
)

func BenchmarkKeyAndCSR(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		key, err := GenerateKey("", 0)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := CreateCSR(key, "node1.example.net", CSRSubject{}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseCSR(b *testing.B) {
	key, _ := GenerateKey("", 0)
	csr, _ := CreateCSR(key, "node1.example.net", CSRSubject{})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseCSR(csr); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyLeaf(b *testing.B) {
	// A self-signed leaf stands in for a CA-signed one: the work (parse,
	// key compare, name check, chain build, signature) is the same.
	key, _ := GenerateKey("", 0)
	certPEM := selfSigned(b, key, "node1.example.net")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := VerifyLeaf(certPEM, certPEM, key.Public(), "node1.example.net", time.Now()); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeCSR is the form check a CSR gets where its signature was
// already checked (or is checked by the signer next).
func BenchmarkDecodeCSR(b *testing.B) {
	key, _ := GenerateKey("", 0)
	csr, _ := CreateCSR(key, "node1.example.net", CSRSubject{})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeCSR(csr); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyChain is the check of a CA-signed leaf (what the helper's
// reply validation, the provisioner and the node's configure each do
// once): parse, key compare, name check, chain build with the CA's
// signature.
func BenchmarkVerifyChain(b *testing.B) {
	key, _ := GenerateKey("", 0)
	caPEM, leafPEM := caSigned(b, key, "node1.example.net")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := VerifyChain(leafPEM, caPEM, key.Public(), "node1.example.net", time.Now()); err != nil {
			b.Fatal(err)
		}
	}
}
