package x509ca_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/x509ca"
)

// The parity test signs the same CSR with internal/ca (cfssl) and with
// x509ca and compares the certificates field by field: every element of
// the to-be-signed certificate except the serial number and the validity
// byte for byte (version, signature algorithm, issuer, subject, public key,
// every extension in order), the serials by size and sign, the validity
// within a minute and its length exactly.

const leafValidity = 72 * time.Hour

// signers is one CA loaded by both signers.
type signers struct {
	cfssl  *ca.CA
	x509   *x509ca.CA
	caCert *x509.Certificate
	caPEM  []byte
}

// cfsslCA is the CA "muster ca init" makes (cfssl's initca, ECDSA P-256).
func cfsslCA(t *testing.T) signers {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := ca.Init(dir, "Parity CA", 0); err != nil {
		t.Fatal(err)
	}
	c, err := ca.LoadDir(dir, leafValidity)
	if err != nil {
		t.Fatal(err)
	}
	x, err := x509ca.LoadDir(dir, leafValidity)
	if err != nil {
		t.Fatal(err)
	}
	return signers{cfssl: c, x509: x, caCert: c.Certificate(), caPEM: c.CertificatePEM()}
}

// selfSignedCA makes a CA of another key type with crypto/x509 and loads
// it into both signers.
func selfSignedCA(t *testing.T, key crypto.Signer) signers {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(7),
		Subject:               pkix.Name{CommonName: "Parity CA", Organization: []string{"Muster"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM, err := pki.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ca.New(certPEM, keyPEM, leafValidity)
	if err != nil {
		t.Fatal(err)
	}
	x, err := x509ca.New(certPEM, keyPEM, leafValidity)
	if err != nil {
		t.Fatal(err)
	}
	return signers{cfssl: c, x509: x, caCert: c.Certificate(), caPEM: certPEM}
}

func mustKey(t *testing.T, kind string) crypto.Signer {
	t.Helper()
	var (
		k   crypto.Signer
		err error
	)
	switch kind {
	case "p256":
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "p384":
		k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "rsa2048":
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case "rsa3072":
		k, err = rsa.GenerateKey(rand.Reader, 3072)
	case "ed25519":
		_, k, err = ed25519.GenerateKey(rand.Reader)
	default:
		t.Fatalf("key kind %q", kind)
	}
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func csrPEM(t *testing.T, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := asn1.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// basicConstraints is the CSR extension's value.
type basicConstraints struct {
	IsCA       bool `asn1:"optional"`
	MaxPathLen int  `asn1:"optional,default:-1"`
}

var (
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidDelegationUsage  = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 44363, 44}
	oidEmailAddress     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 1}
	oidTitle            = asn1.ObjectIdentifier{2, 5, 4, 12}
)

const id = "node1.example.net"

// csrCase is one request both signers sign.
type csrCase struct {
	name  string
	key   string
	tmpl  func(t *testing.T) *x509.CertificateRequest
	hosts []string
}

func csrCases() []csrCase {
	plain := func(*testing.T) *x509.CertificateRequest {
		return &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}, DNSNames: []string{id}}
	}
	withNames := func(*testing.T) *x509.CertificateRequest {
		u, _ := url.Parse("spiffe://example.net/node1")
		return &x509.CertificateRequest{
			Subject:        pkix.Name{CommonName: id},
			DNSNames:       []string{id, "alias.example.net"},
			IPAddresses:    []net.IP{net.ParseIP("192.0.2.7"), net.ParseIP("2001:db8::7")},
			EmailAddresses: []string{"root@node1.example.net"},
			URIs:           []*url.URL{u},
		}
	}
	withExt := func(exts ...pkix.Extension) func(*testing.T) *x509.CertificateRequest {
		return func(*testing.T) *x509.CertificateRequest {
			r := plain(nil)
			r.ExtraExtensions = exts
			return r
		}
	}
	return []csrCase{
		{name: "P-256 key, identity as host (what the helper asks)", key: "p256", tmpl: plain, hosts: []string{id}},
		{name: "P-384 key", key: "p384", tmpl: plain, hosts: []string{id}},
		{name: "RSA 2048 key", key: "rsa2048", tmpl: plain, hosts: []string{id}},
		{name: "Ed25519 key", key: "ed25519", tmpl: plain, hosts: []string{id}},
		{name: "full subject", key: "p256", hosts: []string{id}, tmpl: func(*testing.T) *x509.CertificateRequest {
			return &x509.CertificateRequest{Subject: pkix.Name{
				CommonName: id, Country: []string{"MT"}, Province: []string{"Malta"}, Locality: []string{"Valletta"},
				StreetAddress: []string{"1 Main St"}, PostalCode: []string{"VLT 1000"}, Organization: []string{"Muster", "Ops"},
				OrganizationalUnit: []string{"Fleet"}, SerialNumber: "42",
			}}
		}},
		{name: "uncommon subject attributes kept", key: "p256", hosts: []string{id}, tmpl: func(*testing.T) *x509.CertificateRequest {
			return &x509.CertificateRequest{Subject: pkix.Name{CommonName: id, ExtraNames: []pkix.AttributeTypeAndValue{
				{Type: oidEmailAddress, Value: "root@node1.example.net"},
				{Type: oidTitle, Value: "web server"},
			}}}
		}},
		{name: "nil hosts keep the CSR's names", key: "p256", tmpl: withNames, hosts: nil},
		{name: "hosts replace the CSR's names", key: "p256", tmpl: withNames,
			hosts: []string{id, "10.0.0.1", "::1", "ops@example.net", "spiffe://example.net/n1", "broker.example.net:4222"}},
		{name: "empty hosts give no names", key: "p256", tmpl: withNames, hosts: []string{}},
		{name: "basic constraints CA false, no path length", key: "p256", hosts: []string{id},
			tmpl: func(t *testing.T) *x509.CertificateRequest {
				return withExt(pkix.Extension{Id: oidBasicConstraints, Value: mustMarshal(t, basicConstraints{MaxPathLen: -1})})(t)
			}},
		{name: "delegation usage copied", key: "p256", hosts: []string{id},
			tmpl: withExt(pkix.Extension{Id: oidDelegationUsage, Value: []byte{0x05, 0x00}})},
		{name: "requested key usage and unknown extensions ignored", key: "p256", hosts: []string{id},
			tmpl: func(t *testing.T) *x509.CertificateRequest {
				ku := asn1.BitString{Bytes: []byte{0x06}, BitLength: 7} // cert sign, CRL sign
				return withExt(
					pkix.Extension{Id: oidKeyUsage, Critical: true, Value: mustMarshal(t, ku)},
					pkix.Extension{Id: asn1.ObjectIdentifier{1, 2, 3, 4, 5}, Value: []byte{0x05, 0x00}},
				)(t)
			}},
	}
}

func TestParityWithCfssl(t *testing.T) {
	cas := []struct {
		name string
		make func(t *testing.T) signers
	}{
		{"cfssl initca P-256", cfsslCA},
		{"P-384", func(t *testing.T) signers { return selfSignedCA(t, mustKey(t, "p384")) }},
		{"RSA 3072", func(t *testing.T) signers { return selfSignedCA(t, mustKey(t, "rsa3072")) }},
		{"Ed25519", func(t *testing.T) signers { return selfSignedCA(t, mustKey(t, "ed25519")) }},
	}
	for _, cc := range cas {
		t.Run(cc.name, func(t *testing.T) {
			s := cc.make(t)
			for _, tc := range csrCases() {
				t.Run(tc.name, func(t *testing.T) {
					key := mustKey(t, tc.key)
					csr := csrPEM(t, key, tc.tmpl(t))
					want, err := s.cfssl.SignCSR(csr, tc.hosts)
					if err != nil {
						t.Fatalf("cfssl: %v", err)
					}
					got, err := s.x509.SignCSR(csr, tc.hosts)
					if err != nil {
						t.Fatalf("x509ca: %v", err)
					}
					compare(t, want, got)
					for name, p := range map[string][]byte{"cfssl": want, "x509ca": got} {
						leaf, err := pki.VerifyLeaf(p, s.caPEM, key.Public(), "", time.Now())
						if err != nil {
							t.Errorf("%s certificate does not verify: %v", name, err)
							continue
						}
						if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool(s.caCert), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
							t.Errorf("%s certificate is not for client auth: %v", name, err)
						}
					}
				})
			}
		})
	}
}

func pool(c *x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c)
	return p
}

// tbsElements splits a certificate's TBSCertificate into its DER elements.
func tbsElements(t *testing.T, der []byte) [][]byte {
	t.Helper()
	var cert struct {
		TBS       asn1.RawValue
		Algorithm asn1.RawValue
		Signature asn1.BitString
	}
	if rest, err := asn1.Unmarshal(der, &cert); err != nil || len(rest) != 0 {
		t.Fatalf("certificate DER: %v (%d trailing bytes)", err, len(rest))
	}
	var elems [][]byte
	rest := cert.TBS.Bytes
	for len(rest) > 0 {
		var v asn1.RawValue
		var err error
		if rest, err = asn1.Unmarshal(rest, &v); err != nil {
			t.Fatalf("TBS element: %v", err)
		}
		elems = append(elems, v.FullBytes)
	}
	// The outer signature algorithm must equal the TBS one.
	if len(elems) < 3 || !bytes.Equal(cert.Algorithm.FullBytes, elems[2]) {
		t.Fatalf("certificate signature algorithm differs from the TBS one")
	}
	return elems
}

func compare(t *testing.T, wantPEM, gotPEM []byte) {
	t.Helper()
	want, got := parse(t, wantPEM), parse(t, gotPEM)
	we, ge := tbsElements(t, want.Raw), tbsElements(t, got.Raw)
	names := []string{"version", "serial", "signature algorithm", "issuer", "validity", "subject", "public key", "extensions"}
	if len(we) != len(ge) {
		t.Fatalf("TBS has %d elements, cfssl's %d", len(ge), len(we))
	}
	for i := range we {
		if i == 1 || i == 4 { // serial and validity: random and time
			continue
		}
		if !bytes.Equal(we[i], ge[i]) {
			name := fmt.Sprint(i)
			if i < len(names) {
				name = names[i]
			}
			t.Errorf("TBS %s differs:\n cfssl  %x\n x509ca %x", name, we[i], ge[i])
		}
	}
	// The same, field by field, for a readable failure.
	if len(want.Extensions) != len(got.Extensions) {
		t.Errorf("%d extensions, cfssl %d", len(got.Extensions), len(want.Extensions))
	}
	for i := range min(len(want.Extensions), len(got.Extensions)) {
		w, g := want.Extensions[i], got.Extensions[i]
		if !w.Id.Equal(g.Id) || w.Critical != g.Critical || !bytes.Equal(w.Value, g.Value) {
			t.Errorf("extension %d: %v critical=%t %x, cfssl %v critical=%t %x", i, g.Id, g.Critical, g.Value, w.Id, w.Critical, w.Value)
		}
	}
	if got.KeyUsage != want.KeyUsage || fmt.Sprint(got.ExtKeyUsage) != fmt.Sprint(want.ExtKeyUsage) {
		t.Errorf("usages %v %v, cfssl %v %v", got.KeyUsage, got.ExtKeyUsage, want.KeyUsage, want.ExtKeyUsage)
	}
	if got.SignatureAlgorithm != want.SignatureAlgorithm {
		t.Errorf("signature algorithm %v, cfssl %v", got.SignatureAlgorithm, want.SignatureAlgorithm)
	}
	if got.IsCA || !got.BasicConstraintsValid || got.MaxPathLen != want.MaxPathLen || got.MaxPathLenZero != want.MaxPathLenZero {
		t.Errorf("basic constraints valid=%t ca=%t pathlen=%d/%t, cfssl %t %t %d/%t", got.BasicConstraintsValid, got.IsCA,
			got.MaxPathLen, got.MaxPathLenZero, want.BasicConstraintsValid, want.IsCA, want.MaxPathLen, want.MaxPathLenZero)
	}
	if !bytes.Equal(got.SubjectKeyId, want.SubjectKeyId) || !bytes.Equal(got.AuthorityKeyId, want.AuthorityKeyId) || len(got.SubjectKeyId) == 0 {
		t.Errorf("key ids %x / %x, cfssl %x / %x", got.SubjectKeyId, got.AuthorityKeyId, want.SubjectKeyId, want.AuthorityKeyId)
	}
	// Serial: random, positive, at most 20 bytes, like cfssl's.
	for name, c := range map[string]*x509.Certificate{"cfssl": want, "x509ca": got} {
		if c.SerialNumber.Sign() <= 0 || len(c.SerialNumber.Bytes()) > x509ca.SerialBytes || c.SerialNumber.BitLen() > 8*x509ca.SerialBytes-1 {
			t.Errorf("%s serial %x: want a positive number of at most %d bytes", name, c.SerialNumber, x509ca.SerialBytes)
		}
	}
	if got.SerialNumber.Cmp(want.SerialNumber) == 0 {
		t.Error("both serials are equal: not random")
	}
	if got.SerialNumber.BitLen() < 8*x509ca.SerialBytes-24 {
		// 2^-16 chance for a fair 159-bit random number.
		t.Errorf("serial %x is much shorter than %d bytes", got.SerialNumber, x509ca.SerialBytes)
	}
	// Validity: same length, same backdated start (a minute apart at most,
	// when the two signings straddle a rounding boundary).
	if d := got.NotBefore.Sub(want.NotBefore); d < -time.Minute || d > time.Minute {
		t.Errorf("not before %s, cfssl %s", got.NotBefore, want.NotBefore)
	}
	if gl, wl := got.NotAfter.Sub(got.NotBefore), want.NotAfter.Sub(want.NotBefore); gl != wl || gl != leafValidity {
		t.Errorf("lifetime %s, cfssl %s, want %s", gl, wl, leafValidity)
	}
	if got.NotBefore.Second() != 0 || got.NotBefore.Nanosecond() != 0 {
		t.Errorf("not before %s is not on a minute", got.NotBefore)
	}
	if since := time.Since(got.NotBefore); since < x509ca.Backdate-31*time.Second || since > x509ca.Backdate+31*time.Second {
		t.Errorf("not before %s is %s ago, want about %s", got.NotBefore, since, x509ca.Backdate)
	}
}

func parse(t *testing.T, p []byte) *x509.Certificate {
	t.Helper()
	certs, err := pki.ParseCertificates(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(certs) != 1 {
		t.Fatalf("%d certificates, want 1", len(certs))
	}
	return certs[0]
}

// TestParityRefusals: what cfssl refuses, x509ca refuses.
func TestParityRefusals(t *testing.T) {
	s := cfsslCA(t)
	key := mustKey(t, "p256")
	tampered := func(t *testing.T) []byte {
		p := csrPEM(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}})
		block, _ := pem.Decode(p)
		block.Bytes[len(block.Bytes)-3] ^= 0xff // inside the signature
		return pem.EncodeToMemory(block)
	}
	withExt := func(ext pkix.Extension) func(t *testing.T) []byte {
		return func(t *testing.T) []byte {
			return csrPEM(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}, ExtraExtensions: []pkix.Extension{ext}})
		}
	}
	cases := []struct {
		name string
		csr  func(t *testing.T) []byte
		want error
	}{
		{name: "CSR asking for a CA", csr: func(t *testing.T) []byte {
			return withExt(pkix.Extension{Id: oidBasicConstraints, Value: mustMarshal(t, basicConstraints{IsCA: true, MaxPathLen: -1})})(t)
		}, want: x509ca.ErrCARequest},
		{name: "leaf with a path length", csr: func(t *testing.T) []byte {
			return withExt(pkix.Extension{Id: oidBasicConstraints, Value: mustMarshal(t, basicConstraints{MaxPathLen: 0})})(t)
		}, want: pki.ErrBadCSR},
		{name: "leaf with a path length of 2", csr: func(t *testing.T) []byte {
			return withExt(pkix.Extension{Id: oidBasicConstraints, Value: mustMarshal(t, basicConstraints{MaxPathLen: 2})})(t)
		}, want: pki.ErrBadCSR},
		{name: "basic constraints with trailing data", csr: func(t *testing.T) []byte {
			v := append(mustMarshal(t, basicConstraints{MaxPathLen: -1}), 0x05, 0x00)
			return withExt(pkix.Extension{Id: oidBasicConstraints, Value: v})(t)
		}, want: pki.ErrBadCSR},
		{name: "bad signature", csr: tampered, want: pki.ErrBadCSR},
		{name: "not PEM", csr: func(*testing.T) []byte { return []byte("hello") }, want: pki.ErrBadPEM},
		{name: "a certificate, not a CSR", csr: func(*testing.T) []byte { return s.caPEM }, want: pki.ErrBadCSR},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			csr := tc.csr(t)
			if _, err := s.cfssl.SignCSR(csr, []string{id}); err == nil {
				t.Error("cfssl signed it")
			}
			_, err := s.x509.SignCSR(csr, []string{id})
			if !errors.Is(err, tc.want) {
				t.Errorf("x509ca: %v, want %v", err, tc.want)
			}
		})
	}
}
