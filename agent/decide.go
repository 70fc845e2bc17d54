package agent

import (
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
	notAfter, why := completeness(cfg, identity, now)
	if why == "" {
		return Decision{Mode: ModeProduction, Reason: "configuration complete", Config: cfg, NotAfter: notAfter}
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

// completeness returns the certificate expiry, or why the configuration
// cannot run production mode.
func completeness(cfg *config.Config, identity string, now time.Time) (time.Time, string) {
	if cfg.Value(config.KeyMiddlewareHosts) == "" {
		return time.Time{}, config.KeyMiddlewareHosts + " is not set"
	}
	if id := cfg.Value(config.KeyIdentity); id != "" && id != identity {
		return time.Time{}, fmt.Sprintf("configured identity %q is not %q", id, identity)
	}
	files := map[string][]byte{}
	for _, k := range []string{config.KeyCertificate, config.KeyKey, config.KeyCA} {
		p := cfg.Value(k)
		if p == "" {
			return time.Time{}, k + " is not set"
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return time.Time{}, fmt.Sprintf("%s: %v", k, err)
		}
		files[k] = b
	}
	key, err := pki.ParsePrivateKey(files[config.KeyKey])
	if err != nil {
		return time.Time{}, fmt.Sprintf("%s: %v", config.KeyKey, err)
	}
	leaf, err := pki.VerifyLeaf(files[config.KeyCertificate], files[config.KeyCA], key.Public(), identity, now)
	if err != nil {
		return time.Time{}, fmt.Sprintf("certificate: %v", err)
	}
	return leaf.NotAfter, ""
}
