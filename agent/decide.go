package agent

import (
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/pki"
)

// Decision is the outcome of DecideMode.
type Decision struct {
	// Mode to run in; meaningful when Err is nil.
	Mode Mode
	// Reason says why, for the log.
	Reason string
	// Config is the parsed configuration file, nil when there is none or it
	// does not parse.
	Config *config.Config
	// NotAfter is the expiry of the production certificate (production only).
	NotAfter time.Time
	// Serial is the production certificate's serial number in lowercase
	// hex, as the provisioner records it (production only).
	Serial string
	// Err, wrapping ErrNoMode, says why neither mode is possible.
	Err error
}

// DecideMode reads the configuration file and decides the agent's mode at
// now. Production when the configuration is complete: provision is not true,
// middleware_hosts is set, and the certificate at
// plugin.security.file.certificate matches the key, names identity, is
// valid at now and chains to plugin.security.file.ca. Otherwise provisioning
// when the configuration says provision = true, or does not say and
// provisioningEnabled is set (also when there is no configuration file).
// Otherwise Err explains what is missing.
func DecideMode(identity, configFile string, provisioningEnabled bool, now time.Time) Decision {
	return decideMode(identity, configFile, provisioningEnabled, now, nil)
}

// decideMode is DecideMode with the agent's record of the files its last
// configure verified (nil: none).
func decideMode(identity, configFile string, provisioningEnabled bool, now time.Time, known *verifiedFiles) Decision {
	cfg, err := config.Load(configFile)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			if provisioningEnabled {
				return Decision{Mode: ModeProvisioning, Reason: "no configuration file"}
			}
			return Decision{Err: fmt.Errorf("%w: no configuration file at %s", ErrNoMode, configFile)}
		}
		if provisioningEnabled {
			return Decision{Mode: ModeProvisioning, Reason: fmt.Sprintf("configuration unusable: %v", err)}
		}
		return Decision{Err: fmt.Errorf("%w: %w", ErrNoMode, err)}
	}
	provision, provSet := cfg.Bool(config.KeyProvision)
	if provision {
		return Decision{Mode: ModeProvisioning, Reason: config.KeyProvision + " = true", Config: cfg}
	}
	leaf, why := completeness(cfg, identity, now, known)
	if why == "" {
		return Decision{Mode: ModeProduction, Reason: "configuration complete", Config: cfg, NotAfter: leaf.notAfter, Serial: leaf.serial}
	}
	if !provSet && provisioningEnabled {
		return Decision{Mode: ModeProvisioning, Reason: "configuration incomplete: " + why, Config: cfg}
	}
	setting := config.KeyProvision + " = false"
	if !provSet {
		setting = "provisioning disabled"
	}
	return Decision{Config: cfg, Err: fmt.Errorf("%w: configuration %s incomplete (%s) and %s", ErrNoMode, configFile, why, setting)}
}

// verifiedFiles records the certificate, CA and key bytes configure
// verified for an identity, and the window in which that verification holds.
type verifiedFiles struct {
	identity            string
	cert, ca, key       [sha256.Size]byte
	notBefore, notAfter time.Time // the whole chain's validity
	leaf                leafInfo
}

// leafInfo is what the agent keeps of its production certificate.
type leafInfo struct {
	notAfter time.Time
	serial   string
}

func leafOf(c *x509.Certificate) leafInfo {
	return leafInfo{notAfter: c.NotAfter, serial: c.SerialNumber.Text(16)}
}

func newVerifiedFiles(identity string, cert, ca, key []byte, v *pki.Verified) *verifiedFiles {
	return &verifiedFiles{
		identity: identity,
		cert:     sha256.Sum256(cert), ca: sha256.Sum256(ca), key: sha256.Sum256(key),
		notBefore: v.NotBefore, notAfter: v.NotAfter, leaf: leafOf(v.Leaf),
	}
}

// covers reports whether exactly these bytes were verified for identity and
// that verification still holds at now.
func (k *verifiedFiles) covers(identity string, cert, ca, key []byte, now time.Time) bool {
	return k != nil && k.identity == identity &&
		!now.Before(k.notBefore) && !now.After(k.notAfter) &&
		sha256.Sum256(cert) == k.cert && sha256.Sum256(ca) == k.ca && sha256.Sum256(key) == k.key
}

// completeness returns the certificate's expiry and serial, or why the
// configuration cannot run production mode. Files byte-for-byte equal to the ones known
// verified (by this agent's configure, inside their validity window) are
// not parsed and verified again.
func completeness(cfg *config.Config, identity string, now time.Time, known *verifiedFiles) (leafInfo, string) {
	if cfg.Value(config.KeyMiddlewareHosts) == "" {
		return leafInfo{}, config.KeyMiddlewareHosts + " is not set"
	}
	if id := cfg.Value(config.KeyIdentity); id != "" && id != identity {
		return leafInfo{}, fmt.Sprintf("configured identity %q is not %q", id, identity)
	}
	files := map[string][]byte{}
	for _, k := range []string{config.KeyCertificate, config.KeyKey, config.KeyCA} {
		p := cfg.Value(k)
		if p == "" {
			return leafInfo{}, k + " is not set"
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return leafInfo{}, fmt.Sprintf("%s: %v", k, err)
		}
		files[k] = b
	}
	if known.covers(identity, files[config.KeyCertificate], files[config.KeyCA], files[config.KeyKey], now) {
		return known.leaf, ""
	}
	key, err := pki.ParsePrivateKey(files[config.KeyKey])
	if err != nil {
		return leafInfo{}, fmt.Sprintf("%s: %v", config.KeyKey, err)
	}
	leaf, err := pki.VerifyLeaf(files[config.KeyCertificate], files[config.KeyCA], key.Public(), identity, now)
	if err != nil {
		return leafInfo{}, fmt.Sprintf("certificate: %v", err)
	}
	return leafOf(leaf), ""
}
