// Package ca is Muster's certificate authority on disk, built on cfssl: it
// creates an ECDSA P-256 CA, issues broker, provisioner and admin
// certificates (key made locally), and signs node CSRs whose keys never
// leave the node.
package ca

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cloudflare/cfssl/config"
	"github.com/cloudflare/cfssl/csr"
	"github.com/cloudflare/cfssl/initca"
	cflog "github.com/cloudflare/cfssl/log"
	"github.com/cloudflare/cfssl/signer"
	"github.com/cloudflare/cfssl/signer/local"

	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/x509ca"
)

// File names inside a CA directory (shared with internal/x509ca, which
// signs with the same files without cfssl).
const (
	CertFile = x509ca.CertFile
	KeyFile  = x509ca.KeyFile
)

// Defaults.
const (
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultLeafValidity = 365 * 24 * time.Hour
)

// Sentinel errors.
var (
	ErrExists   = errors.New("CA already exists")
	ErrNotFound = errors.New("CA not found")
)

var silenceOnce sync.Once

// Silence turns cfssl's own package logger off; Muster reports what matters
// through its own logs. cfssl keeps its level in a package variable, so this
// is done once per process.
func Silence() {
	silenceOnce.Do(func() { cflog.Level = cflog.LevelFatal + 1 })
}

// CA signs certificates with a key held in memory.
type CA struct {
	cert     *x509.Certificate
	certPEM  []byte
	key      crypto.Signer
	signer   *local.Signer
	validity time.Duration
}

// Init creates a new CA (ECDSA P-256) named cn in dir, writing ca.pem (0644)
// and ca-key.pem (0600). It refuses to overwrite an existing CA.
func Init(dir, cn string, validity time.Duration) (*CA, error) {
	Silence()
	if validity <= 0 {
		validity = DefaultCAValidity
	}
	if _, err := os.Stat(filepath.Join(dir, KeyFile)); err == nil {
		return nil, fmt.Errorf("init ca in %s: %w", dir, ErrExists)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("init ca: %w", err)
	}
	certPEM, _, keyPEM, err := initca.New(&csr.CertificateRequest{
		CN:         cn,
		KeyRequest: &csr.KeyRequest{A: "ecdsa", S: 256},
		Names:      []csr.Name{{O: "Muster"}},
		CA:         &csr.CAConfig{Expiry: validity.String()},
	})
	if err != nil {
		return nil, fmt.Errorf("init ca %s: %w", cn, err)
	}
	if err := fsutil.WriteFilesAtomic([]fsutil.File{
		{Path: filepath.Join(dir, KeyFile), Data: keyPEM, Perm: 0o600},
		{Path: filepath.Join(dir, CertFile), Data: certPEM, Perm: 0o644},
	}); err != nil {
		return nil, fmt.Errorf("init ca: %w", err)
	}
	return New(certPEM, keyPEM, 0)
}

// Load reads a CA from certFile and keyFile.
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

// New builds a CA from PEM certificate and key. leafValidity 0 means
// DefaultLeafValidity.
func New(certPEM, keyPEM []byte, leafValidity time.Duration) (*CA, error) {
	Silence()
	if leafValidity <= 0 {
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
		return nil, fmt.Errorf("ca certificate %s is not a CA", cert.Subject.CommonName)
	}
	policy := &config.Signing{
		Default: &config.SigningProfile{
			Usage:        []string{"signing", "digital signature", "key encipherment", "server auth", "client auth"},
			Expiry:       leafValidity,
			ExpiryString: leafValidity.String(),
		},
	}
	s, err := local.NewSigner(key, cert, signer.DefaultSigAlgo(key), policy)
	if err != nil {
		return nil, fmt.Errorf("ca signer: %w", err)
	}
	return &CA{cert: cert, certPEM: certPEM, key: key, signer: s, validity: leafValidity}, nil
}

// Certificate returns the CA certificate.
func (c *CA) Certificate() *x509.Certificate { return c.cert }

// CertificatePEM returns the CA certificate as PEM.
func (c *CA) CertificatePEM() []byte { return c.certPEM }

// Pin returns the CA's public key pin (sha256:<hex>).
func (c *CA) Pin() string { return pki.Pin(c.cert) }

// SignCSR signs a PEM CSR. hosts become the certificate's SANs (DNS names or
// IP addresses); when empty the CSR's own SANs are kept. The caller is
// responsible for policy (who may get which name). The CSR's form is checked
// here (one PEM block, size limit) and its signature by cfssl's signer, once.
func (c *CA) SignCSR(csrPEM []byte, hosts []string) ([]byte, error) {
	if _, err := pki.DecodeCSR(csrPEM); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	cert, err := c.signer.Sign(signer.SignRequest{Request: string(csrPEM), Hosts: hosts})
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return cert, nil
}

// Issued is a certificate and key made by Issue.
type Issued struct {
	CertPEM []byte
	KeyPEM  []byte
}

// Issue makes a key and a certificate for cn with the given SANs (host names
// or IP addresses), for brokers, provisioners and operators.
func (c *CA) Issue(cn string, hosts []string) (*Issued, error) {
	key, err := pki.GenerateKey("", 0)
	if err != nil {
		return nil, err
	}
	csrPEM, err := pki.CreateCSR(key, cn, pki.CSRSubject{Organization: "Muster"})
	if err != nil {
		return nil, err
	}
	if len(hosts) == 0 {
		hosts = []string{cn}
	}
	certPEM, err := c.SignCSR(csrPEM, hosts)
	if err != nil {
		return nil, fmt.Errorf("issue %s: %w", cn, err)
	}
	keyPEM, err := pki.MarshalPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &Issued{CertPEM: certPEM, KeyPEM: keyPEM}, nil
}

// WriteIssued writes an issued certificate (with the CA appended, so a
// server sends its full chain: an agent that knows only the CA's pin finds
// the CA in it) and key into dir as <name>.pem and <name>-key.pem, the key
// 0600, atomically.
func (c *CA) WriteIssued(dir, name string, is *Issued) (certFile, keyFile string, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", err
	}
	certFile = filepath.Join(dir, name+".pem")
	keyFile = filepath.Join(dir, name+"-key.pem")
	chain := append(append([]byte{}, is.CertPEM...), c.certPEM...)
	err = fsutil.WriteFilesAtomic([]fsutil.File{
		{Path: keyFile, Data: is.KeyPEM, Perm: 0o600},
		{Path: certFile, Data: chain, Perm: 0o644},
	})
	return certFile, keyFile, err
}
