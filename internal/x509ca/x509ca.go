// Package x509ca signs node certificate requests with a CA made by
// "muster ca init" (internal/ca), using only the standard library's
// crypto/x509. It issues exactly the certificates internal/ca's cfssl
// signer issues (same subject, names, key usages, extensions, serial size,
// validity and signature algorithm; a parity test holds the two together),
// but does not link cfssl and its dependency tree, so a program built on it
// starts in a couple of milliseconds: the muster-helper binary signs with
// it.
package x509ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/mail"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/muster-io/muster/internal/pki"
)

// File names inside a CA directory (the ones "muster ca init" writes).
const (
	CertFile = "ca.pem"
	KeyFile  = "ca-key.pem"
)

// DefaultLeafValidity is the lifetime of a signed certificate when New is
// given none (the same as internal/ca's).
const DefaultLeafValidity = 365 * 24 * time.Hour

// Backdate is how far before the signing time (rounded to the minute) a
// certificate becomes valid, so a node whose clock is a little behind
// accepts it. cfssl's default, which internal/ca uses.
const Backdate = 5 * time.Minute

// SerialBytes is the size of the random serial number: 20 bytes, the
// largest RFC 5280 allows, with the top bit cleared so it is positive.
const SerialBytes = 20

// Sentinel errors.
var (
	// ErrNotFound means a CA directory has no CA key.
	ErrNotFound = errors.New("CA not found")
	// ErrNotCA means the certificate given as the CA is not a CA
	// certificate.
	ErrNotCA = errors.New("certificate is not a CA")
	// ErrCARequest refuses a CSR that asks for a CA certificate (basic
	// constraints with CA true): nodes get leaf certificates only.
	ErrCARequest = errors.New("CSR asks for a CA certificate")
)

// Extension identifiers the signer looks at in a CSR.
var (
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	// oidDelegationUsage marks a certificate allowed to issue TLS delegated
	// credentials; cfssl copies it from the CSR into the certificate, and
	// so does this signer.
	oidDelegationUsage = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 44363, 44}
)

// CA signs certificate requests with a CA certificate and key held in
// memory. It is safe for concurrent use.
type CA struct {
	cert     *x509.Certificate
	certPEM  []byte
	key      crypto.Signer
	sigAlg   x509.SignatureAlgorithm
	validity time.Duration
	now      func() time.Time
	rand     io.Reader
}

// Load reads the CA certificate and key from certFile and keyFile.
// leafValidity 0 means DefaultLeafValidity.
func Load(certFile, keyFile string, leafValidity time.Duration) (*CA, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("load ca key: %w", err)
	}
	return New(certPEM, keyPEM, leafValidity)
}

// LoadDir reads ca.pem and ca-key.pem from dir.
func LoadDir(dir string, leafValidity time.Duration) (*CA, error) {
	if _, err := os.Stat(filepath.Join(dir, KeyFile)); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("load ca from %s: %w", dir, ErrNotFound)
	}
	return Load(filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile), leafValidity)
}

// New builds a CA from a PEM certificate (the first one is the CA; more may
// follow) and its PEM private key. It refuses a key that is not the
// certificate's, a certificate that is not a CA and a key type it cannot
// sign with. leafValidity 0 means DefaultLeafValidity.
func New(certPEM, keyPEM []byte, leafValidity time.Duration) (*CA, error) {
	if leafValidity < 0 {
		return nil, fmt.Errorf("ca: leaf validity %s: must be positive", leafValidity)
	}
	if leafValidity == 0 {
		leafValidity = DefaultLeafValidity
	}
	certs, err := pki.ParseCertificates(certPEM)
	if err != nil {
		return nil, fmt.Errorf("ca certificate: %w", err)
	}
	key, err := pki.ParsePrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("ca key: %w", err)
	}
	cert := certs[0]
	if !pki.SamePublicKey(key.Public(), cert.PublicKey) {
		return nil, fmt.Errorf("ca key: %w", pki.ErrKeyMismatch)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("ca certificate %s: %w", cert.Subject.CommonName, ErrNotCA)
	}
	alg, err := signatureAlgorithm(key.Public())
	if err != nil {
		return nil, fmt.Errorf("ca key: %w", err)
	}
	return &CA{
		cert:     cert,
		certPEM:  certPEM,
		key:      key,
		sigAlg:   alg,
		validity: leafValidity,
		now:      time.Now,
		rand:     rand.Reader,
	}, nil
}

// signatureAlgorithm picks the signature algorithm for a CA key the way
// cfssl does: SHA-256 with P-256 and RSA keys of 2048 bits, SHA-384 with
// P-384 and RSA 3072, SHA-512 with P-521 and RSA 4096 and more, Ed25519
// with Ed25519. Weaker keys are refused.
func signatureAlgorithm(pub crypto.PublicKey) (x509.SignatureAlgorithm, error) {
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		switch pub.Curve {
		case elliptic.P256():
			return x509.ECDSAWithSHA256, nil
		case elliptic.P384():
			return x509.ECDSAWithSHA384, nil
		case elliptic.P521():
			return x509.ECDSAWithSHA512, nil
		}
		return 0, fmt.Errorf("ECDSA curve %s: %w", pub.Curve.Params().Name, pki.ErrKeyPolicy)
	case *rsa.PublicKey:
		switch bits := pub.N.BitLen(); {
		case bits >= 4096:
			return x509.SHA512WithRSA, nil
		case bits >= 3072:
			return x509.SHA384WithRSA, nil
		case bits >= 2048:
			return x509.SHA256WithRSA, nil
		default:
			return 0, fmt.Errorf("RSA key of %d bits: %w", bits, pki.ErrKeyPolicy)
		}
	case ed25519.PublicKey:
		return x509.PureEd25519, nil
	}
	return 0, fmt.Errorf("key of type %T: %w", pub, pki.ErrKeyPolicy)
}

// Certificate returns the CA certificate.
func (c *CA) Certificate() *x509.Certificate { return c.cert }

// CertificatePEM returns the CA certificate as it was loaded (PEM).
func (c *CA) CertificatePEM() []byte { return c.certPEM }

// Validity returns the lifetime of the certificates it signs.
func (c *CA) Validity() time.Duration { return c.validity }

// SignCSR checks a PEM CSR (one PEM block, size limit, its signature) and
// signs a certificate for its key. The subject is the CSR's. hosts become
// the certificate's names (an IP address, an e-mail address, a URI, or else
// a DNS name, tried in that order); nil keeps the CSR's own names, an empty
// slice gives none. The certificate is a leaf (basic constraints CA
// false) for digital signature and key encipherment, server and client
// authentication, with subject and authority key identifiers, a random
// positive 20-byte serial, valid from the signing time rounded to the
// minute less Backdate for the CA's leaf validity. A CSR asking for a CA
// certificate is refused (ErrCARequest). The caller is responsible for
// policy: who may get which name.
func (c *CA) SignCSR(csrPEM []byte, hosts []string) ([]byte, error) {
	csr, err := pki.ParseCSR(csrPEM)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	tmpl, err := c.template(csr, hosts)
	if err != nil {
		return nil, fmt.Errorf("sign csr for %q: %w", csr.Subject.CommonName, err)
	}
	der, err := x509.CreateCertificate(c.rand, tmpl, c.cert, csr.PublicKey, c.key)
	if err != nil {
		return nil, fmt.Errorf("sign csr for %q: %w", csr.Subject.CommonName, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// template builds the certificate for csr.
func (c *CA) template(csr *x509.CertificateRequest, hosts []string) (*x509.Certificate, error) {
	subject, err := csrSubject(csr.RawSubject)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		Subject:            subject,
		SignatureAlgorithm: c.sigAlg,
		DNSNames:           csr.DNSNames,
		IPAddresses:        csr.IPAddresses,
		EmailAddresses:     csr.EmailAddresses,
		URIs:               csr.URIs,
		KeyUsage:           x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:        []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		// A leaf: basic constraints CA false, without a path length.
		BasicConstraintsValid: true,
	}
	for _, ext := range csr.Extensions {
		switch {
		case ext.Id.Equal(oidBasicConstraints):
			var bc struct {
				IsCA       bool `asn1:"optional"`
				MaxPathLen int  `asn1:"optional,default:-1"`
			}
			rest, err := asn1.Unmarshal(ext.Value, &bc)
			if err != nil {
				return nil, fmt.Errorf("%w: basic constraints: %w", pki.ErrBadCSR, err)
			}
			if len(rest) != 0 {
				return nil, fmt.Errorf("%w: trailing data after basic constraints", pki.ErrBadCSR)
			}
			if bc.IsCA {
				return nil, ErrCARequest
			}
			if bc.MaxPathLen != -1 {
				// cfssl passes it on and crypto/x509 refuses a path
				// length on a leaf.
				return nil, fmt.Errorf("%w: path length %d on a leaf", pki.ErrBadCSR, bc.MaxPathLen)
			}
		case ext.Id.Equal(oidDelegationUsage):
			tmpl.ExtraExtensions = append(tmpl.ExtraExtensions, ext)
		}
	}
	if hosts != nil {
		setHosts(tmpl, hosts)
	}
	serial := make([]byte, SerialBytes)
	if _, err := io.ReadFull(c.rand, serial); err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	serial[0] &= 0x7f
	tmpl.SerialNumber = new(big.Int).SetBytes(serial)
	ski, err := subjectKeyID(csr.PublicKey)
	if err != nil {
		return nil, err
	}
	tmpl.SubjectKeyId = ski
	tmpl.NotBefore = c.now().Round(time.Minute).Add(-Backdate).UTC()
	tmpl.NotAfter = tmpl.NotBefore.Add(c.validity).UTC()
	return tmpl, nil
}

// commonAttribute reports whether an attribute type is one pkix.Name has a
// field for (CN, serial number, C, L, ST, street, O, OU, postal code);
// other subject attributes are carried over as ExtraNames.
func commonAttribute(t asn1.ObjectIdentifier) bool {
	if len(t) != 4 || t[0] != 2 || t[1] != 5 || t[2] != 4 {
		return false
	}
	switch t[3] {
	case 3, 5, 6, 7, 8, 9, 10, 11, 17:
		return true
	}
	return false
}

// csrSubject is the certificate subject for a CSR's raw subject: the named
// fields, then every other attribute in its original order.
func csrSubject(raw []byte) (pkix.Name, error) {
	var rdns pkix.RDNSequence
	if _, err := asn1.Unmarshal(raw, &rdns); err != nil {
		return pkix.Name{}, fmt.Errorf("%w: subject: %w", pki.ErrBadCSR, err)
	}
	var name pkix.Name
	name.FillFromRDNSequence(&rdns)
	for _, rdn := range rdns {
		for _, atv := range rdn {
			if !commonAttribute(atv.Type) {
				name.ExtraNames = append(name.ExtraNames, atv)
			}
		}
	}
	return name, nil
}

// setHosts replaces the certificate's names with hosts.
func setHosts(tmpl *x509.Certificate, hosts []string) {
	tmpl.IPAddresses = []net.IP{}
	tmpl.EmailAddresses = []string{}
	tmpl.DNSNames = []string{}
	tmpl.URIs = []*url.URL{}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			continue
		}
		if addr, err := mail.ParseAddress(h); err == nil {
			tmpl.EmailAddresses = append(tmpl.EmailAddresses, addr.Address)
			continue
		}
		if u, err := url.ParseRequestURI(h); err == nil {
			tmpl.URIs = append(tmpl.URIs, u)
			continue
		}
		tmpl.DNSNames = append(tmpl.DNSNames, h)
	}
}

// subjectKeyID is the SHA-1 of the public key's bit string (RFC 5280
// 4.2.1.2, method 1).
func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("subject key id: %w", err)
	}
	var spki struct {
		Algorithm        pkix.AlgorithmIdentifier
		SubjectPublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		return nil, fmt.Errorf("subject key id: %w", err)
	}
	sum := sha1.Sum(spki.SubjectPublicKey.Bytes)
	return sum[:], nil
}
