// Package cfsslhelper is Muster's built-in provisioning helper (package
// helper/builtin) signing with a cfssl CA (internal/ca). It is what the
// provisioner runs in-process with helper_config, and what "muster helper
// cfssl" runs as a helper program. The muster-helper binary is the same
// helper signing with crypto/x509 alone (internal/x509ca), for a fast
// exec'd helper.
package cfsslhelper

import (
	"fmt"
	"time"

	"github.com/muster-io/muster/helper/builtin"
	"github.com/muster-io/muster/internal/ca"
)

// The helper, its configuration and its errors are package builtin's.
type (
	// Helper is the built-in helper.
	Helper = builtin.Helper
	// Config is the built-in helper's configuration.
	Config = builtin.Config
	// CAFiles names the CA certificate and key files.
	CAFiles = builtin.CAFiles
	// Rule sets configuration on the nodes whose facts all match.
	Rule = builtin.Rule
)

// Sentinel errors (those of package builtin).
var (
	ErrCNMismatch = builtin.ErrCNMismatch
	ErrBadRequest = builtin.ErrBadRequest
	ErrNoCA       = builtin.ErrNoCA
)

// Configuration keys the helper always writes, and defaults.
const (
	KeyIdentity        = builtin.KeyIdentity
	KeyMiddlewareHosts = builtin.KeyMiddlewareHosts
	KeyProvider        = builtin.KeyProvider
	KeyCertificate     = builtin.KeyCertificate
	KeyPrivateKey      = builtin.KeyPrivateKey
	KeyCA              = builtin.KeyCA
	KeyProvision       = builtin.KeyProvision
	DefaultValidity    = builtin.DefaultValidity
	DefaultSSLDir      = builtin.DefaultSSLDir
)

// LoadConfig reads a YAML configuration file, applies defaults and
// validates it (builtin.LoadConfig).
func LoadConfig(file string) (*Config, error) { return builtin.LoadConfig(file) }

// ParseConfig parses YAML, applies defaults and validates
// (builtin.ParseConfig).
func ParseConfig(data []byte) (*Config, error) { return builtin.ParseConfig(data) }

// LoadCA loads a cfssl CA from its files; it is the builtin.LoadSigner of
// New and of "muster helper cfssl".
func LoadCA(certFile, keyFile string, validity time.Duration) (builtin.Signer, error) {
	return ca.Load(certFile, keyFile, validity)
}

// New validates cfg and loads the cfssl CA it names.
func New(cfg *Config) (*Helper, error) { return builtin.NewFromFiles(cfg, LoadCA) }

// NewWithCA validates cfg and signs with c (ignoring cfg.CA); the demo
// uses it with a throwaway CA held in memory. c signs with its own leaf
// validity.
func NewWithCA(c *ca.CA, cfg *Config) (*Helper, error) {
	if c == nil {
		return nil, fmt.Errorf("cfssl helper: %w", ErrNoCA)
	}
	return builtin.New(c, cfg)
}
