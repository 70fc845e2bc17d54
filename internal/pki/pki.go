// Package pki holds the certificate checks shared by the agent, the helper
// runner and the provisioner: key and CSR generation on the node, strict PEM
// parsing with size limits, and the verification that a certificate matches a
// key, names an identity and chains to a CA.
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"time"
)

// MaxPEMSize bounds any PEM input (a CA bundle of a few certificates fits
// comfortably).
const MaxPEMSize = 64 * 1024

// Sentinel errors.
var (
	ErrBadPEM           = errors.New("bad PEM")
	ErrKeyMismatch      = errors.New("certificate does not match the key")
	ErrIdentityMismatch = errors.New("certificate does not name the identity")
	ErrUntrusted        = errors.New("certificate does not chain to the CA")
	ErrExpired          = errors.New("certificate expired or not yet valid")
	ErrBadCSR           = errors.New("bad certificate request")
	ErrKeyPolicy        = errors.New("key type or size not allowed")
	ErrBadPin           = errors.New("bad CA pin")
)

// GenerateKey makes a private key: keyType "ecdsa-p256" (or empty) or "rsa"
// with bits 2048, 3072 or 4096 (0 means 2048).
func GenerateKey(keyType string, bits int) (crypto.Signer, error) {
	switch keyType {
	case "", "ecdsa-p256":
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "rsa":
		if bits == 0 {
			bits = 2048
		}
		if bits != 2048 && bits != 3072 && bits != 4096 {
			return nil, fmt.Errorf("rsa %d bits: %w", bits, ErrKeyPolicy)
		}
		return rsa.GenerateKey(rand.Reader, bits)
	default:
		return nil, fmt.Errorf("key type %q: %w", keyType, ErrKeyPolicy)
	}
}

// MarshalPrivateKey returns the PKCS#8 PEM encoding of key.
func MarshalPrivateKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParsePrivateKey parses a PEM private key (PKCS#8, SEC1 EC or PKCS#1 RSA).
func ParsePrivateKey(data []byte) (crypto.Signer, error) {
	block, err := onePEM(data)
	if err != nil {
		return nil, err
	}
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		if s, ok := k.(crypto.Signer); ok {
			return s, nil
		}
		return nil, fmt.Errorf("private key of type %T: %w", k, ErrKeyPolicy)
	}
	if k, err := x509.ParseECPrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	if k, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	return nil, fmt.Errorf("private key: %w", ErrBadPEM)
}

// MarshalPublicKey returns the PKIX PEM encoding of pub.
func MarshalPublicKey(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// CSRSubject carries optional subject fields for CreateCSR.
type CSRSubject struct {
	Country, Locality, Organization, OrgUnit, State string
}

// CreateCSR makes a PEM certificate request for identity signed by key. The
// CN and the only DNS SAN are the identity.
func CreateCSR(key crypto.Signer, identity string, subj CSRSubject) ([]byte, error) {
	name := pkix.Name{CommonName: identity}
	add := func(dst *[]string, v string) {
		if v != "" {
			*dst = []string{v}
		}
	}
	add(&name.Country, subj.Country)
	add(&name.Locality, subj.Locality)
	add(&name.Organization, subj.Organization)
	add(&name.OrganizationalUnit, subj.OrgUnit)
	add(&name.Province, subj.State)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:  name,
		DNSNames: []string{identity},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("create csr for %s: %w", identity, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// ParseCSR parses exactly one PEM certificate request and checks its
// signature.
func ParseCSR(data []byte) (*x509.CertificateRequest, error) {
	csr, err := DecodeCSR(data)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %v", ErrBadCSR, err)
	}
	return csr, nil
}

// DecodeCSR parses exactly one PEM certificate request (size limit, PEM
// type, no trailing data) without checking its signature. It is for a CSR
// whose signature was already checked by ParseCSR, or that goes on to a
// signer that checks it (cfssl does), so the costly signature verification
// happens once per CSR, not once per layer.
func DecodeCSR(data []byte) (*x509.CertificateRequest, error) {
	block, err := onePEM(data)
	if err != nil {
		return nil, err
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("PEM type %q: %w", block.Type, ErrBadCSR)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	return csr, nil
}

// ParseCertificates parses one or more PEM certificates. Non-certificate
// blocks and trailing garbage are errors.
func ParseCertificates(data []byte) ([]*x509.Certificate, error) {
	if len(data) > MaxPEMSize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrBadPEM, len(data), MaxPEMSize)
	}
	var certs []*x509.Certificate
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%w: unexpected block %q", ErrBadPEM, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadPEM, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%w: no certificate", ErrBadPEM)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: trailing data", ErrBadPEM)
	}
	return certs, nil
}

func onePEM(data []byte) (*pem.Block, error) {
	if len(data) > MaxPEMSize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrBadPEM, len(data), MaxPEMSize)
	}
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%w: no PEM block", ErrBadPEM)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: trailing data", ErrBadPEM)
	}
	return block, nil
}

// SamePublicKey reports whether a and b are the same public key.
func SamePublicKey(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	ea, ok := a.(equaler)
	return ok && ea.Equal(b)
}

// CertNames reports whether cert names identity, as its CN or a DNS SAN.
func CertNames(cert *x509.Certificate, identity string) bool {
	if strings.EqualFold(cert.Subject.CommonName, identity) {
		return true
	}
	for _, n := range cert.DNSNames {
		if strings.EqualFold(n, identity) {
			return true
		}
	}
	return false
}

// VerifyLeaf checks that the first certificate in certPEM matches pub, names
// identity, is valid at now, and chains to one of the certificates in caPEM
// (extra certificates in certPEM are used as intermediates). It returns the
// leaf.
func VerifyLeaf(certPEM, caPEM []byte, pub crypto.PublicKey, identity string, now time.Time) (*x509.Certificate, error) {
	v, err := VerifyChain(certPEM, caPEM, pub, identity, now)
	if err != nil {
		return nil, err
	}
	return v.Leaf, nil
}

// Verified is what VerifyChain established.
type Verified struct {
	// Leaf is the verified certificate.
	Leaf *x509.Certificate
	// NotBefore and NotAfter bound the times at which every certificate of
	// the verified chain (leaf, intermediates, root) is valid: the same
	// files verify again at any time inside the window, and at none outside
	// it.
	NotBefore, NotAfter time.Time
}

// VerifyChain does what VerifyLeaf does and also returns the window in which
// the whole verified chain is valid, so a caller that keeps the exact bytes
// it verified can tell later that they still verify without doing it again.
func VerifyChain(certPEM, caPEM []byte, pub crypto.PublicKey, identity string, now time.Time) (*Verified, error) {
	certs, err := ParseCertificates(certPEM)
	if err != nil {
		return nil, fmt.Errorf("certificate: %w", err)
	}
	leaf := certs[0]
	if pub != nil && !SamePublicKey(pub, leaf.PublicKey) {
		return nil, ErrKeyMismatch
	}
	if identity != "" && !CertNames(leaf, identity) {
		return nil, fmt.Errorf("%w: %s", ErrIdentityMismatch, identity)
	}
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("%w: valid %s to %s", ErrExpired, leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	cas, err := ParseCertificates(caPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	roots := x509.NewCertPool()
	for _, c := range cas {
		roots.AddCert(c)
	}
	var inter *x509.CertPool
	if len(certs) > 1 {
		inter = x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
	}
	chains, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUntrusted, err)
	}
	v := &Verified{Leaf: leaf, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter}
	// The window of the first chain found: Verify may find several, and
	// another might stay valid longer, but a narrower window only means
	// verifying again sooner.
	for _, c := range chains[0] {
		if c.NotBefore.After(v.NotBefore) {
			v.NotBefore = c.NotBefore
		}
		if c.NotAfter.Before(v.NotAfter) {
			v.NotAfter = c.NotAfter
		}
	}
	return v, nil
}

// WithoutTrustAnchors returns a certificate chain (DER, leaf first, as in
// tls.Certificate) without the self-signed certificates after the leaf, so
// a TLS endpoint does not send its root. A peer verifies the chain against
// roots it already holds (RFC 8446 § 4.4.2 lets the sender omit them), and
// Go's verifier, given the root in the chain too, checks the leaf's
// signature twice: once against the copy sent and once against its own
// (about a tenth of a handshake's CPU on the development machine).
// Intermediates stay, as do certificates that do not parse: the TLS stack
// reports those.
func WithoutTrustAnchors(chain [][]byte) [][]byte {
	if len(chain) < 2 {
		return chain
	}
	kept := [][]byte{chain[0]}
	for _, der := range chain[1:] {
		c, err := x509.ParseCertificate(der)
		if err == nil && bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil {
			continue
		}
		kept = append(kept, der)
	}
	return kept
}

// Pin returns the kubeadm-style pin of a CA certificate:
// "sha256:" + hex(SHA-256 of its SubjectPublicKeyInfo).
func Pin(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// ParsePin validates a pin string and returns its normalised form.
func ParsePin(pin string) (string, error) {
	p := strings.ToLower(strings.TrimSpace(pin))
	h, ok := strings.CutPrefix(p, "sha256:")
	if !ok {
		return "", fmt.Errorf("%w: %q lacks the sha256: prefix", ErrBadPin, pin)
	}
	if b, err := hex.DecodeString(h); err != nil || len(b) != sha256.Size {
		return "", fmt.Errorf("%w: %q is not 64 hex digits", ErrBadPin, pin)
	}
	return p, nil
}
