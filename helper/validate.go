package helper

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"

	"github.com/muster-io/muster/internal/pki"
)

// Limits on a helper reply's content.
const (
	MaxConfigKeys     = 1000
	MaxConfigKeyLen   = 256
	MaxConfigValueLen = 4 << 10
	MaxPolicies       = 100
	MaxPolicySize     = 64 << 10
	MaxMsgLen         = 4 << 10
	MaxUpgradeLen     = 64
)

// ValidateOptions relaxes ValidateReply's defaults.
type ValidateOptions struct {
	// AllowKey accepts a reply carrying a centrally made private key
	// ("key"). Off by default: Muster's node keys never leave the nodes.
	AllowKey bool
}

// ValidateReply checks rep against the request it answers, with the default
// options, at time now. See ValidateReplyWith.
func ValidateReply(req *Request, rep *Reply, now time.Time) error {
	return ValidateReplyWith(req, rep, now, ValidateOptions{})
}

// ValidateReplyWith checks rep against req before anything reaches the
// node. A reply must be exactly one of defer, shutdown or configure (a
// non-empty configuration). A configure reply must have valid configuration
// keys and values (see ValidateConfiguration), an "identity" key (when set)
// equal to the request's identity, and, when the request carried a CSR, a
// certificate that matches the CSR's public key, names the identity, is
// valid at now and chains to the reply's CA, with ssldir (when set) equal
// to the CSR's. A central key is refused unless opts.AllowKey. Every
// failure wraps ErrInvalidReply with the precise reason.
func ValidateReplyWith(req *Request, rep *Reply, now time.Time, opts ValidateOptions) error {
	if req == nil || rep == nil {
		return fmt.Errorf("%w: nil request or reply", ErrInvalidReply)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w for %s: %s", ErrInvalidReply, req.Identity, fmt.Sprintf(format, args...))
	}
	configure := len(rep.Configuration) > 0
	modes := 0
	for _, on := range []bool{rep.Defer, rep.Shutdown, configure} {
		if on {
			modes++
		}
	}
	switch {
	case modes == 0:
		return bad("reply neither defers, shuts down nor configures")
	case modes > 1:
		return bad("reply must be exactly one of defer, shutdown or configure (defer=%t shutdown=%t configuration keys=%d)", rep.Defer, rep.Shutdown, len(rep.Configuration))
	}
	if len(rep.Msg) > MaxMsgLen {
		return bad("msg is %d bytes, limit %d", len(rep.Msg), MaxMsgLen)
	}
	if rep.RetryAfter < 0 {
		return bad("retry_after %d is negative", rep.RetryAfter)
	}
	if req.RequestID != "" && rep.RequestID != "" && rep.RequestID != req.RequestID {
		return bad("request_id %q answers another request", rep.RequestID)
	}
	if !configure {
		return nil
	}
	if err := ValidateConfiguration(rep.Configuration); err != nil {
		return fmt.Errorf("%w for %s: %w", ErrInvalidReply, req.Identity, err)
	}
	if id, ok := rep.Configuration["identity"]; ok && id != req.Identity {
		return bad("configuration sets identity %q", id)
	}
	if rep.Key != "" && !opts.AllowKey {
		return bad("reply carries a central private key, which is not allowed (keys never leave the nodes)")
	}
	if err := validatePolicies("action_policies", rep.ActionPolicies); err != nil {
		return bad("%v", err)
	}
	if err := validatePolicies("opa_policies", rep.OPAPolicies); err != nil {
		return bad("%v", err)
	}
	if len(rep.ServerClaims) > 0 {
		t := bytes.TrimSpace(rep.ServerClaims)
		if !bytes.Equal(t, []byte("null")) && (len(t) == 0 || t[0] != '{' || !json.Valid(t)) {
			return bad("server_claims is not a JSON object")
		}
	}
	if rep.Upgrade != "" {
		if len(rep.Upgrade) > MaxUpgradeLen || strings.IndexFunc(rep.Upgrade, unicode.IsSpace) >= 0 {
			return bad("upgrade %q is not a version", rep.Upgrade)
		}
	}
	return validateCertificate(req, rep, now, opts, bad)
}

// validateCertificate checks the certificate part of a configure reply.
func validateCertificate(req *Request, rep *Reply, now time.Time, opts ValidateOptions, bad func(string, ...any) error) error {
	if req.CSR == nil {
		if rep.Certificate == "" {
			return nil
		}
		if rep.Key == "" {
			return bad("certificate without a CSR or a key it could belong to")
		}
		// A central key (allowed above): the certificate must be for it.
		key, err := pki.ParsePrivateKey([]byte(rep.Key))
		if err != nil {
			return bad("key: %v", err)
		}
		if rep.CA == "" {
			return bad("certificate without a CA")
		}
		if _, err := pki.VerifyLeaf([]byte(rep.Certificate), []byte(rep.CA), key.Public(), req.Identity, now); err != nil {
			return fmt.Errorf("%w for %s: %w", ErrInvalidReply, req.Identity, err)
		}
		return nil
	}
	if rep.Certificate == "" {
		return bad("request carried a CSR but the reply has no certificate")
	}
	if rep.CA == "" {
		return bad("reply has a certificate but no CA")
	}
	if rep.SSLDir != "" && rep.SSLDir != req.CSR.SSLDir {
		return bad("ssldir %q differs from the node's %q", rep.SSLDir, req.CSR.SSLDir)
	}
	var pub any
	if rep.Key != "" {
		key, err := pki.ParsePrivateKey([]byte(rep.Key))
		if err != nil {
			return bad("key: %v", err)
		}
		pub = key.Public()
	} else {
		// The request is the caller's own: its CSR's signature was checked
		// when the node sent it (the provisioner's gencsr check). Only its
		// public key matters here.
		csr, err := pki.DecodeCSR([]byte(req.CSR.CSR))
		if err != nil {
			return bad("request CSR: %v", err)
		}
		pub = csr.PublicKey
	}
	if _, err := pki.VerifyLeaf([]byte(rep.Certificate), []byte(rep.CA), pub, req.Identity, now); err != nil {
		return fmt.Errorf("%w for %s: %w", ErrInvalidReply, req.Identity, err)
	}
	return nil
}

// ValidateConfiguration checks a flat configuration as it will be written
// to a node's configuration file: at most MaxConfigKeys keys; keys
// non-empty, at most MaxConfigKeyLen bytes, without whitespace, '=', '#',
// path separators, ".." or control characters; values at most
// MaxConfigValueLen bytes without newlines or NUL. It reports every bad
// key at once.
func ValidateConfiguration(cfg map[string]string) error {
	if len(cfg) > MaxConfigKeys {
		return fmt.Errorf("configuration has %d keys, limit %d", len(cfg), MaxConfigKeys)
	}
	var errs []error
	for k, v := range cfg {
		if err := ValidateConfigKey(k); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := validateConfigValue(k, v); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ValidateConfigKey checks one configuration key (see
// ValidateConfiguration).
func ValidateConfigKey(k string) error {
	switch {
	case k == "":
		return errors.New("configuration key is empty")
	case len(k) > MaxConfigKeyLen:
		return fmt.Errorf("configuration key %.32q...: %d bytes, limit %d", k, len(k), MaxConfigKeyLen)
	case strings.ContainsAny(k, "=#"):
		return fmt.Errorf("configuration key %q contains '=' or '#'", k)
	case strings.ContainsAny(k, `/\`):
		return fmt.Errorf("configuration key %q contains a path separator", k)
	case strings.Contains(k, ".."):
		return fmt.Errorf("configuration key %q contains '..'", k)
	case strings.IndexFunc(k, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0:
		return fmt.Errorf("configuration key %q contains whitespace or a control character", k)
	}
	return nil
}

func validateConfigValue(k, v string) error {
	switch {
	case len(v) > MaxConfigValueLen:
		return fmt.Errorf("configuration value of %q: %d bytes, limit %d", k, len(v), MaxConfigValueLen)
	case strings.ContainsAny(v, "\n\r\x00"):
		return fmt.Errorf("configuration value of %q contains a newline or NUL", k)
	}
	return nil
}

// validatePolicies checks policy file names (they become file names on the
// node) and sizes.
func validatePolicies(field string, p map[string]string) error {
	if len(p) > MaxPolicies {
		return fmt.Errorf("%s has %d entries, limit %d", field, len(p), MaxPolicies)
	}
	for name, text := range p {
		if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\\\x00") ||
			strings.IndexFunc(name, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0 {
			return fmt.Errorf("%s name %q is not a plain file name", field, name)
		}
		if len(text) > MaxPolicySize {
			return fmt.Errorf("%s %q: %d bytes, limit %d", field, name, len(text), MaxPolicySize)
		}
	}
	return nil
}
