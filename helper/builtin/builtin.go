// Package builtin is Muster's built-in provisioning helper: it builds the
// node's configuration from a base (identity, brokers, file security
// provider in the node's ssldir), the operator's defaults and fact-matching
// rules, defers nodes that lack required facts, and signs the node's CSR
// through a Signer. It runs in-process (it implements helper.Helper) or as
// a Choria-compatible helper program: "muster helper cfssl" signs with
// cfssl (helper/cfsslhelper), the small muster-helper binary with
// crypto/x509 alone (internal/x509ca). Both read the same configuration
// and flags (Flags) and give the same replies.
package builtin

import (
	"context"
	"errors"
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// Sentinel errors.
var (
	// ErrCNMismatch refuses a CSR whose common name is not the identity.
	ErrCNMismatch = errors.New("CSR common name is not the node identity")
	// ErrBadRequest is a request the helper cannot work with.
	ErrBadRequest = errors.New("bad helper request")
	// ErrNoCA means the configuration names no CA (or no Signer was
	// given).
	ErrNoCA = errors.New("no CA configured")
)

// Configuration keys the helper always writes.
const (
	KeyIdentity        = "identity"
	KeyMiddlewareHosts = "plugin.choria.middleware_hosts"
	KeyProvider        = "plugin.security.provider"
	KeyCertificate     = "plugin.security.file.certificate"
	KeyPrivateKey      = "plugin.security.file.key"
	KeyCA              = "plugin.security.file.ca"
	KeyProvision       = "plugin.choria.server.provision"
)

// Signer signs a node's CSR; the helper declares what it needs of a CA.
// internal/ca (cfssl) and internal/x509ca (crypto/x509) implement it.
type Signer interface {
	// SignCSR checks the PEM CSR, including its signature, and returns a
	// PEM certificate for its key naming hosts.
	SignCSR(csrPEM []byte, hosts []string) ([]byte, error)
	// CertificatePEM is the CA certificate returned to nodes as "ca".
	CertificatePEM() []byte
}

// LoadSigner loads the CA a configuration names: its certificate and key
// files, signing certificates valid for validity.
type LoadSigner func(certFile, keyFile string, validity time.Duration) (Signer, error)

// Helper is the built-in helper. It is safe for concurrent use.
type Helper struct {
	signer Signer
	cfg    *Config
}

var _ helper.Helper = (*Helper)(nil)

// New validates cfg and returns the helper signing with s (cfg.CA is not
// used; s signs with its own leaf validity). A nil cfg is an empty
// configuration.
func New(s Signer, cfg *Config) (*Helper, error) {
	if s == nil {
		return nil, fmt.Errorf("built-in helper: %w", ErrNoCA)
	}
	if cfg == nil {
		cfg = &Config{}
	}
	cfg = cfg.clone()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Helper{signer: s, cfg: cfg}, nil
}

// NewFromFiles validates cfg, loads the CA its ca.cert and ca.key name
// with load (for cfg's validity) and returns the helper signing with it.
func NewFromFiles(cfg *Config, load LoadSigner) (*Helper, error) {
	if cfg == nil {
		return nil, errors.New("built-in helper: nil config")
	}
	cfg = cfg.clone()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.CA.Cert == "" {
		return nil, fmt.Errorf("built-in helper: ca.cert and ca.key: %w", ErrNoCA)
	}
	s, err := load(cfg.CA.Cert, cfg.CA.Key, cfg.validity)
	if err != nil {
		return nil, fmt.Errorf("built-in helper: %w", err)
	}
	return &Helper{signer: s, cfg: cfg}, nil
}

// Provision answers one request: a defer (with a message) when the node
// lacks a fact DeferUnless requires, a fact a placeholder needs, or a
// broker address; otherwise a configuration, and with a CSR a certificate
// signed for the identity, the CA and the node's ssldir.
func (h *Helper) Provision(ctx context.Context, req *helper.Request) (*helper.Reply, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if req == nil {
		return nil, fmt.Errorf("%w: nil request", ErrBadRequest)
	}
	if err := protocol.ValidateIdentity(req.Identity); err != nil {
		return nil, fmt.Errorf("%w: identity: %w", ErrBadRequest, err)
	}
	var inv protocol.Inventory
	if req.Inventory != "" {
		if err := protocol.DecodeLenient([]byte(req.Inventory), helper.MaxRequestSize, &inv); err != nil {
			return nil, fmt.Errorf("%w: inventory of %s: %w", ErrBadRequest, req.Identity, err)
		}
	}
	facts := inv.Facts

	for _, k := range sortedKeys(h.cfg.DeferUnless) {
		v, ok := facts[k]
		if !ok {
			return deferReply(fmt.Sprintf("fact %s is missing", k)), nil
		}
		if m, _ := path.Match(h.cfg.DeferUnless[k], v); !m {
			return deferReply(fmt.Sprintf("fact %s=%q does not match %q", k, v, h.cfg.DeferUnless[k])), nil
		}
	}

	ssldir := h.cfg.SSLDir
	if req.CSR != nil {
		if !strings.HasPrefix(req.CSR.SSLDir, "/") {
			return nil, fmt.Errorf("%w: ssldir %q of %s is not an absolute path", ErrBadRequest, req.CSR.SSLDir, req.Identity)
		}
		ssldir = req.CSR.SSLDir
	}
	vars := &templateVars{identity: req.Identity, ssldir: ssldir, facts: facts}
	conf, applied, msg, err := h.configuration(vars, facts)
	if err != nil {
		return nil, fmt.Errorf("configuration for %s: %w", req.Identity, err)
	}
	if msg != "" {
		return deferReply(msg), nil
	}
	rep := &helper.Reply{Configuration: conf, Msg: "configured by the built-in helper"}
	if len(applied) > 0 {
		rep.Msg += "; rules: " + strings.Join(applied, ", ")
	}
	if req.CSR == nil {
		return rep, nil
	}
	// The signature is checked once, by the Signer.
	csr, err := pki.DecodeCSR([]byte(req.CSR.CSR))
	if err != nil {
		return nil, fmt.Errorf("%w: csr of %s: %w", ErrBadRequest, req.Identity, err)
	}
	if csr.Subject.CommonName != req.Identity {
		return nil, fmt.Errorf("sign csr for %s: CN %q: %w", req.Identity, csr.Subject.CommonName, ErrCNMismatch)
	}
	cert, err := h.signer.SignCSR([]byte(req.CSR.CSR), []string{req.Identity})
	if err != nil {
		return nil, fmt.Errorf("sign csr for %s: %w", req.Identity, err)
	}
	rep.Certificate = string(cert)
	rep.CA = string(h.signer.CertificatePEM())
	rep.SSLDir = ssldir
	return rep, nil
}

// configuration renders base, defaults and matching rules. A non-empty msg
// means the node must be deferred.
func (h *Helper) configuration(vars *templateVars, facts map[string]string) (conf map[string]string, applied []string, msg string, err error) {
	conf = map[string]string{
		KeyIdentity:    vars.identity,
		KeyProvider:    "file",
		KeyCertificate: vars.ssldir + "/certificate.pem",
		KeyPrivateKey:  vars.ssldir + "/private.pem",
		KeyCA:          vars.ssldir + "/ca.pem",
		KeyProvision:   "false",
	}
	if h.cfg.MiddlewareHosts != "" {
		conf[KeyMiddlewareHosts] = h.cfg.MiddlewareHosts
	}
	apply := func(source string, set map[string]string) (string, error) {
		for _, k := range sortedKeys(set) {
			v, err := render(set[k], vars)
			if errors.Is(err, errMissingFact) {
				return fmt.Sprintf("%s sets %s from a %v", source, k, err), nil
			}
			if err != nil {
				return "", fmt.Errorf("%s.%s: %w", source, k, err)
			}
			if strings.ContainsAny(v, "\n\r\x00") {
				return "", fmt.Errorf("%s.%s: rendered value contains a newline or NUL (from a fact)", source, k)
			}
			conf[k] = v
		}
		return "", nil
	}
	if msg, err := apply("defaults", h.cfg.Defaults); msg != "" || err != nil {
		return nil, nil, msg, err
	}
	for _, r := range h.cfg.Rules {
		if !matches(r.Facts, facts) {
			continue
		}
		if msg, err := apply("rule "+r.Name, r.Set); msg != "" || err != nil {
			return nil, nil, msg, err
		}
		applied = append(applied, r.Name)
	}
	if conf[KeyMiddlewareHosts] == "" {
		return nil, nil, "no " + KeyMiddlewareHosts + " for this node (set middleware_hosts, a default or a rule)", nil
	}
	return conf, applied, "", nil
}

// matches reports whether every fact glob matches the node's fact.
func matches(globs, facts map[string]string) bool {
	for k, g := range globs {
		v, ok := facts[k]
		if !ok {
			return false
		}
		if m, _ := path.Match(g, v); !m {
			return false
		}
	}
	return true
}

func deferReply(msg string) *helper.Reply {
	return &helper.Reply{Defer: true, Msg: msg}
}
