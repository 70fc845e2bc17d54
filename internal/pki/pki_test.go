package pki

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"
)

func TestKeyAndCSR(t *testing.T) {
	cases := []struct {
		name    string
		keyType string
		bits    int
		err     error
	}{
		{"default ecdsa", "", 0, nil},
		{"ecdsa named", "ecdsa-p256", 0, nil},
		{"rsa default bits", "rsa", 0, nil},
		{"rsa 1024 refused", "rsa", 1024, ErrKeyPolicy},
		{"dsa refused", "dsa", 0, ErrKeyPolicy},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			key, err := GenerateKey(c.keyType, c.bits)
			if c.err != nil {
				if !errors.Is(err, c.err) {
					t.Fatalf("err %v, want %v", err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			csrPEM, err := CreateCSR(key, "n1.example.net", CSRSubject{Country: "mt"})
			if err != nil {
				t.Fatal(err)
			}
			csr, err := ParseCSR(csrPEM)
			if err != nil {
				t.Fatal(err)
			}
			if csr.Subject.CommonName != "n1.example.net" || len(csr.DNSNames) != 1 {
				t.Fatalf("subject %v sans %v", csr.Subject, csr.DNSNames)
			}
			if !SamePublicKey(key.Public(), csr.PublicKey) {
				t.Fatal("csr key differs")
			}
			keyPEM, err := MarshalPrivateKey(key)
			if err != nil {
				t.Fatal(err)
			}
			back, err := ParsePrivateKey(keyPEM)
			if err != nil || !SamePublicKey(back.Public(), key.Public()) {
				t.Fatalf("private key round trip: %v", err)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	key, _ := GenerateKey("", 0)
	csrPEM, _ := CreateCSR(key, "n1", CSRSubject{})
	tampered := []byte(strings.Replace(string(csrPEM), "A", "B", 3))
	cases := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"garbage", []byte("hello")},
		{"trailing", append(append([]byte{}, csrPEM...), []byte("junk")...)},
		{"two blocks", append(append([]byte{}, csrPEM...), csrPEM...)},
		{"tampered", tampered},
		{"huge", []byte(strings.Repeat("A", MaxPEMSize+1))},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := ParseCSR(c.data); err == nil {
				t.Fatal("parsed")
			}
			if _, err := ParseCertificates(c.data); err == nil {
				t.Fatal("parsed as certificates")
			}
		})
	}
}

func TestParsePin(t *testing.T) {
	good := "sha256:" + strings.Repeat("ab", 32)
	if p, err := ParsePin(strings.ToUpper(good)); err != nil || p != good {
		t.Fatalf("ParsePin = %q, %v", p, err)
	}
	for _, bad := range []string{"", "ab", "sha1:" + strings.Repeat("ab", 20), "sha256:zz", "sha256:" + strings.Repeat("ab", 31)} {
		if _, err := ParsePin(bad); !errors.Is(err, ErrBadPin) {
			t.Errorf("ParsePin(%q) = %v", bad, err)
		}
	}
}

func FuzzParseCSR(f *testing.F) {
	key, _ := GenerateKey("", 0)
	csrPEM, _ := CreateCSR(key, "n1.example.net", CSRSubject{})
	f.Add(csrPEM)
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		csr, err := ParseCSR(data)
		if err == nil && csr.CheckSignature() != nil {
			t.Fatal("csr with bad signature accepted")
		}
	})
}

func FuzzParsePEM(f *testing.F) {
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Add([]byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if certs, err := ParseCertificates(data); err == nil {
			for _, c := range certs {
				if c == nil {
					t.Fatal("nil certificate")
				}
			}
		}
		_, _ = ParsePrivateKey(data)
		if c, err := x509.ParseCertificate(data); err == nil {
			_ = Pin(c)
		}
	})
}

func selfSigned(tb testing.TB, key crypto.Signer, cn string) []byte {
	tb.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: cn},
		DNSNames:              []string{cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		tb.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// TestDecodeCSR checks that DecodeCSR keeps ParseCSR's form checks and leaves
// out only the signature check.
func TestDecodeCSR(t *testing.T) {
	key, _ := GenerateKey("", 0)
	csrPEM, _ := CreateCSR(key, "n1", CSRSubject{})
	block, _ := pem.Decode(csrPEM)
	der := append([]byte{}, block.Bytes...)
	der[len(der)-3] ^= 0xff // inside the signature
	badSig := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	if _, err := ParseCSR(badSig); !errors.Is(err, ErrBadCSR) {
		t.Fatalf("ParseCSR of a bad signature: %v, want ErrBadCSR", err)
	}
	csr, err := DecodeCSR(badSig)
	if err != nil || csr.Subject.CommonName != "n1" {
		t.Fatalf("DecodeCSR of a bad signature: %v", err)
	}
	for name, in := range map[string][]byte{
		"two blocks":  append(append([]byte{}, csrPEM...), csrPEM...),
		"certificate": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: block.Bytes}),
		"oversized":   append(append([]byte{}, csrPEM...), make([]byte, MaxPEMSize)...),
		"garbage":     []byte("csr"),
	} {
		if _, err := DecodeCSR(in); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// caSigned returns a CA certificate and a leaf for cn signed by it, with
// leafKey's public key.
func caSigned(tb testing.TB, leafKey crypto.Signer, cn string) (caPEM, leafPEM []byte) {
	tb.Helper()
	caKey, _ := GenerateKey("", 0)
	caPEM = selfSigned(tb, caKey, "Test CA")
	caCert, err := ParseCertificates(caPEM)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: cn},
		DNSNames:     []string{cn},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(30 * time.Minute),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert[0], leafKey.Public(), caKey)
	if err != nil {
		tb.Fatal(err)
	}
	return caPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// TestVerifyChainWindow checks that the window is the intersection of the
// chain's validity periods.
func TestVerifyChainWindow(t *testing.T) {
	key, _ := GenerateKey("", 0)
	caPEM, leafPEM := caSigned(t, key, "n1.example.net")
	v, err := VerifyChain(leafPEM, caPEM, key.Public(), "n1.example.net", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := ParseCertificates(caPEM)
	// The CA (valid ±1h) outlives the leaf's end but starts earlier.
	if !v.NotBefore.Equal(v.Leaf.NotBefore) || !v.NotAfter.Equal(v.Leaf.NotAfter) || v.NotAfter.After(ca[0].NotAfter) {
		t.Errorf("window %s..%s, leaf %s..%s, ca %s..%s", v.NotBefore, v.NotAfter, v.Leaf.NotBefore, v.Leaf.NotAfter, ca[0].NotBefore, ca[0].NotAfter)
	}
	other, _ := GenerateKey("", 0)
	if _, err := VerifyChain(leafPEM, caPEM, other.Public(), "n1.example.net", time.Now()); !errors.Is(err, ErrKeyMismatch) {
		t.Errorf("other key: %v", err)
	}
	if _, err := VerifyChain(leafPEM, caPEM, key.Public(), "n1.example.net", time.Now().Add(2*time.Hour)); !errors.Is(err, ErrExpired) {
		t.Errorf("expired: %v", err)
	}
}

// FuzzDecodeCSR checks that DecodeCSR is ParseCSR without the signature
// check: whatever ParseCSR accepts it accepts, whatever it refuses ParseCSR
// refuses, and nothing over the size limit passes.
func FuzzDecodeCSR(f *testing.F) {
	key, _ := GenerateKey("", 0)
	csrPEM, _ := CreateCSR(key, "n1.example.net", CSRSubject{})
	f.Add(csrPEM)
	f.Add([]byte("-----BEGIN NEW CERTIFICATE REQUEST-----\nAAAA\n-----END NEW CERTIFICATE REQUEST-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		csr, derr := DecodeCSR(data)
		_, perr := ParseCSR(data)
		if perr == nil && derr != nil {
			t.Fatalf("ParseCSR accepts what DecodeCSR refuses: %v", derr)
		}
		if derr == nil && (csr == nil || len(data) > MaxPEMSize) {
			t.Fatal("DecodeCSR accepted an oversized input or returned nil")
		}
	})
}

// issueDER signs a certificate for key named cn with parent (itself when
// parent is nil), a CA certificate when isCA.
func issueDER(tb testing.TB, key crypto.Signer, cn string, isCA bool, parent *x509.Certificate, parentKey crypto.Signer) *x509.Certificate {
	tb.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		BasicConstraintsValid: true,
		IsCA:                  isCA,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

func TestWithoutTrustAnchors(t *testing.T) {
	key := func() crypto.Signer { k, _ := GenerateKey("", 0); return k }
	rootKey, interKey, leafKey, otherKey := key(), key(), key(), key()
	root := issueDER(t, rootKey, "Root", true, nil, nil)
	inter := issueDER(t, interKey, "Intermediate", true, root, rootKey)
	leaf := issueDER(t, leafKey, "broker.example.net", false, inter, interKey)
	direct := issueDER(t, leafKey, "node.example.net", false, root, rootKey)
	selfLeaf := issueDER(t, leafKey, "self.example.net", false, nil, nil)
	// Named like a root (subject = issuer) but signed by another key: not
	// self-signed, so not a trust anchor this function may drop.
	lookalike := issueDER(t, otherKey, "Root", true, root, rootKey)
	garbage := []byte("not a certificate")
	der := func(cs ...*x509.Certificate) [][]byte {
		var out [][]byte
		for _, c := range cs {
			out = append(out, c.Raw)
		}
		return out
	}
	cases := []struct {
		name  string
		chain [][]byte
		want  [][]byte
	}{
		{"empty", nil, nil},
		{"leaf alone", der(direct), der(direct)},
		{"leaf and root", der(direct, root), der(direct)},
		{"leaf, intermediate, root", der(leaf, inter, root), der(leaf, inter)},
		{"leaf and intermediate", der(leaf, inter), der(leaf, inter)},
		{"self-signed leaf stays", der(selfLeaf), der(selfLeaf)},
		{"self-signed leaf and root", der(selfLeaf, root), der(selfLeaf)},
		{"lookalike root stays", der(direct, lookalike), der(direct, lookalike)},
		{"unparsable stays", append(der(direct), garbage), append(der(direct), garbage)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := WithoutTrustAnchors(tc.chain)
			if len(got) != len(tc.want) {
				t.Fatalf("%d certificates, want %d", len(got), len(tc.want))
			}
			for i := range got {
				if string(got[i]) != string(tc.want[i]) {
					t.Errorf("certificate %d differs", i)
				}
			}
		})
	}
}
