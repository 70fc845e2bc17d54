package broker

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/pki"
)

// Development PKI names.
const (
	// DevPKIDir is the development PKI's directory inside store_dir.
	DevPKIDir = "pki"
	// DevAdminCN is the CN of the development admin certificate.
	DevAdminCN = "muster-admin"
	// DevCACN is the CN of the development CA.
	DevCACN = "Muster development CA"
	// ProvisionerSeedFile is the provisioner nkey seed's file name.
	ProvisionerSeedFile = "provisioner.nk"
	// TokenIssuerSeedFile is the development token issuer's seed file name.
	TokenIssuerSeedFile = "token-issuer.nk"
)

// DevPKI is the development PKI the broker makes when no TLS is configured.
type DevPKI struct {
	// Dir is <store_dir>/pki.
	Dir string
	// CACert and CAKey are the CA (ca.pem, ca-key.pem).
	CACert, CAKey string
	// ServerCert and ServerKey are the broker's certificate (server.pem,
	// server-key.pem).
	ServerCert, ServerKey string
	// AdminCert and AdminKey are the admin's client certificate (CN
	// muster-admin; admin.pem, admin-key.pem).
	AdminCert, AdminKey string
	// ProvisionerSeed is the provisioner's nkey seed file (provisioner.nk,
	// 0600).
	ProvisionerSeed string
	// ProvisionerPublicKey is the provisioner's nkey public key.
	ProvisionerPublicKey string
	// TokenIssuerSeed is the development token issuer's nkey account seed
	// (token-issuer.nk, 0600); `muster token create --issuer` signs with it.
	TokenIssuerSeed string
	// TokenIssuerPublicKey is its public key, trusted by the broker.
	TokenIssuerPublicKey string
}

// ensureDevPKI makes or reuses the development PKI in dir. The server
// certificate is issued again when it does not cover every host, has
// expired or no longer chains to the CA.
func ensureDevPKI(dir string, hosts []string, now time.Time) (*DevPKI, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("dev pki: %w", err)
	}
	authority, err := ca.LoadDir(dir, 0)
	if errors.Is(err, ca.ErrNotFound) {
		authority, err = ca.Init(dir, DevCACN, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("dev pki: %w", err)
	}
	d := &DevPKI{
		Dir:             dir,
		CACert:          filepath.Join(dir, ca.CertFile),
		CAKey:           filepath.Join(dir, ca.KeyFile),
		ProvisionerSeed: filepath.Join(dir, ProvisionerSeedFile),
		TokenIssuerSeed: filepath.Join(dir, TokenIssuerSeedFile),
	}
	if d.ServerCert, d.ServerKey, err = ensureLeaf(authority, dir, "server", "localhost", hosts, now); err != nil {
		return nil, fmt.Errorf("dev pki server certificate: %w", err)
	}
	if d.AdminCert, d.AdminKey, err = ensureLeaf(authority, dir, "admin", DevAdminCN, nil, now); err != nil {
		return nil, fmt.Errorf("dev pki admin certificate: %w", err)
	}
	if d.ProvisionerPublicKey, err = ensureSeed(d.ProvisionerSeed, nkeys.PrefixByteUser); err != nil {
		return nil, fmt.Errorf("dev pki provisioner nkey: %w", err)
	}
	if d.TokenIssuerPublicKey, err = ensureSeed(d.TokenIssuerSeed, nkeys.PrefixByteAccount); err != nil {
		return nil, fmt.Errorf("dev pki token issuer nkey: %w", err)
	}
	return d, nil
}

// ensureLeaf reuses <dir>/<name>.pem when it chains to the CA, is valid at
// now, names cn and covers hosts; otherwise it issues a new one.
func ensureLeaf(authority *ca.CA, dir, name, cn string, hosts []string, now time.Time) (string, string, error) {
	certFile := filepath.Join(dir, name+".pem")
	keyFile := filepath.Join(dir, name+"-key.pem")
	if leafUsable(authority, certFile, keyFile, cn, hosts, now) {
		return certFile, keyFile, nil
	}
	issued, err := authority.Issue(cn, hosts)
	if err != nil {
		return "", "", err
	}
	return authority.WriteIssued(dir, name, issued)
}

func leafUsable(authority *ca.CA, certFile, keyFile, cn string, hosts []string, now time.Time) bool {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return false
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return false
	}
	certs, err := pki.ParseCertificates(certPEM)
	if err != nil {
		return false
	}
	key, err := pki.ParsePrivateKey(keyPEM)
	if err != nil || !pki.SamePublicKey(key.Public(), certs[0].PublicKey) {
		return false
	}
	leaf := certs[0]
	if leaf.Subject.CommonName != cn {
		return false
	}
	roots := x509.NewCertPool()
	roots.AddCert(authority.Certificate())
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return false
	}
	for _, h := range hosts {
		if leaf.VerifyHostname(h) != nil {
			return false
		}
	}
	return true
}

// ensureSeed reads the nkey seed of the given kind (user or account) in
// file, or makes one (0600), and returns its public key.
func ensureSeed(file string, kind nkeys.PrefixByte) (string, error) {
	seed, err := os.ReadFile(file)
	switch {
	case err == nil:
		kp, err := nkeys.FromSeed(seed)
		if err != nil {
			return "", fmt.Errorf("%s: not an nkey seed", file)
		}
		defer kp.Wipe()
		pub, err := kp.PublicKey()
		if err != nil {
			return "", err
		}
		if nkeys.Prefix(pub) != kind {
			return "", fmt.Errorf("%s: not a %s nkey", file, kind)
		}
		return pub, nil
	case errors.Is(err, os.ErrNotExist):
	default:
		return "", err
	}
	kp, err := nkeys.CreatePair(kind)
	if err != nil {
		return "", err
	}
	defer kp.Wipe()
	seed, err = kp.Seed()
	if err != nil {
		return "", err
	}
	if err := fsutil.WriteFileAtomic(file, seed, 0o600); err != nil {
		return "", err
	}
	return kp.PublicKey()
}

// serverHosts returns the names the development server certificate covers:
// localhost, the loopback addresses and the listen host (or, for a wildcard
// listen address, the machine's host name).
func serverHosts(listenHost string) []string {
	hosts := []string{"localhost", "127.0.0.1", "::1"}
	add := func(h string) {
		for _, x := range hosts {
			if x == h {
				return
			}
		}
		hosts = append(hosts, h)
	}
	ip := net.ParseIP(listenHost)
	switch {
	case listenHost == "" || (ip != nil && ip.IsUnspecified()):
		if hn, err := os.Hostname(); err == nil && hn != "" {
			add(hn)
		}
	default:
		add(listenHost)
	}
	return hosts
}
