package provisioner

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// Sentinel errors of the provisioner-side checks.
var (
	// ErrPolicy wraps every CSR or certificate the policy refuses.
	ErrPolicy = errors.New("refused by provisioner policy")
	// ErrHeld marks a node held for an operator's decision.
	ErrHeld = errors.New("node held for operator approval")
	// ErrDenied marks a node an operator denied.
	ErrDenied = errors.New("node denied by an operator")
	// ErrUnknownNode is returned by Approve and Deny for an identity the
	// provisioner does not know.
	ErrUnknownNode = errors.New("unknown node")
	// ErrNotHeld is returned by Approve and Deny for a node that is not
	// held.
	ErrNotHeld = errors.New("node is not held")
)

// Policy rejection reasons: the label values of
// muster_provisioner_policy_rejections_total.
const (
	rejectCSR          = "csr"           // signature, CN or public_key of the CSR
	rejectSAN          = "san"           // a SAN outside policy.san_allow
	rejectKey          = "key"           // key type or size outside policy
	rejectCertKey      = "cert_key"      // certificate for another key
	rejectCertIdentity = "cert_identity" // certificate for another identity
	rejectCertChain    = "cert_chain"    // certificate not chaining to policy.ca_file
	rejectCert         = "cert"          // any other certificate problem
)

var rejectReasons = []string{rejectCSR, rejectSAN, rejectKey, rejectCertKey, rejectCertIdentity, rejectCertChain, rejectCert}

// Hold reasons.
const (
	// HoldKeyChanged: an identity provisioned before came back with a
	// different key.
	HoldKeyChanged = "key_changed"
	// HoldDuplicateConnection: two live connections claim one identity.
	HoldDuplicateConnection = "duplicate_connection"
)

// maxCSRSANs bounds the SANs one CSR may carry.
const maxCSRSANs = 64

// policyError is a refusal by the policy with its metric reason.
type policyError struct {
	reason string
	err    error
}

func (e *policyError) Error() string { return fmt.Sprintf("%v: %s: %v", ErrPolicy, e.reason, e.err) }
func (e *policyError) Unwrap() []error {
	return []error{ErrPolicy, e.err}
}

func refuse(reason string, format string, args ...any) error {
	return &policyError{reason: reason, err: fmt.Errorf(format, args...)}
}

// holdError stops an attempt because the node is held or denied.
type holdError struct {
	reason string // a Hold* reason; empty for a denial
	denied bool
	fp     string                // fingerprint of the key the node presented
	csr    *protocol.GenCSRReply // the gencsr reply to reuse on approval
}

func (e *holdError) Error() string {
	if e.denied {
		return ErrDenied.Error()
	}
	if e.reason == HoldKeyChanged {
		return fmt.Sprintf("%v: %s: the identity was provisioned before with another key (new key %s)", ErrHeld, e.reason, e.fp)
	}
	return fmt.Sprintf("%v: %s", ErrHeld, e.reason)
}

func (e *holdError) Unwrap() error {
	if e.denied {
		return ErrDenied
	}
	return ErrHeld
}

// approval is an operator's one-shot permission for the next attempt of a
// held node: with csr set, that attempt reuses the held gencsr reply (the
// key the operator saw) instead of asking the node for a new key; without
// it (a hold that had no key, or one from before a restart) the attempt's
// new key is accepted.
type approval struct {
	csr *protocol.GenCSRReply
	fp  string
}

// guard is the compiled policy.
type guard struct {
	san      []sanPattern
	keyTypes map[string]bool
	rsaMin   int
	caPEM    []byte // policy.ca_file; nil when not set
	// caPEMTrimmed is caPEM without surrounding white space, to tell a
	// helper's ca that is the same bundle.
	caPEMTrimmed []byte
}

func newGuard(pol Policy) (*guard, error) {
	g := &guard{keyTypes: map[string]bool{}, rsaMin: pol.RSAMinBits}
	for _, s := range pol.SANAllow {
		sp, err := compileSANPattern(s)
		if err != nil {
			return nil, err
		}
		g.san = append(g.san, sp)
	}
	for _, k := range pol.KeyTypes {
		g.keyTypes[k] = true
	}
	if pol.CAFile != "" {
		data, err := readCAFile(pol.CAFile)
		if err != nil {
			return nil, err
		}
		g.caPEM, g.caPEMTrimmed = data, bytes.TrimSpace(data)
	}
	return g, nil
}

func readCAFile(path string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: policy.ca_file %q: %s", ErrConfig, path, errText(err))
	}
	if st.Size() > pki.MaxPEMSize {
		return nil, fmt.Errorf("%w: policy.ca_file %q: larger than %d bytes", ErrConfig, path, pki.MaxPEMSize)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: policy.ca_file %q: %s", ErrConfig, path, errText(err))
	}
	certs, err := pki.ParseCertificates(data)
	if err != nil {
		return nil, fmt.Errorf("%w: policy.ca_file %q: %v", ErrConfig, path, err)
	}
	for _, c := range certs {
		if !c.IsCA {
			return nil, fmt.Errorf("%w: policy.ca_file %q: certificate %q is not a CA", ErrConfig, path, c.Subject.CommonName)
		}
	}
	return data, nil
}

// validate reports every problem with the policy section. keyType is the
// key type nodes are asked to generate.
func (pol *Policy) validate(keyType string) []error {
	var errs []error
	bad := func(key string, val any, why string) {
		errs = append(errs, fmt.Errorf("%w: policy.%s %v: %s", ErrConfig, key, val, why))
	}
	if len(pol.SANAllow) > maxSANPatterns {
		bad("san_allow", len(pol.SANAllow), fmt.Sprintf("at most %d patterns", maxSANPatterns))
	}
	for i, s := range pol.SANAllow {
		if _, err := compileSANPattern(s); err != nil {
			bad(fmt.Sprintf("san_allow[%d]", i), fmt.Sprintf("%q", s), err.Error())
		}
	}
	if len(pol.KeyTypes) == 0 {
		bad("key_types", "[]", "at least one key type is required")
	}
	for i, k := range pol.KeyTypes {
		switch k {
		case PolicyKeyECDSAP256, PolicyKeyECDSAP384, PolicyKeyEd25519, PolicyKeyRSA:
		default:
			bad(fmt.Sprintf("key_types[%d]", i), fmt.Sprintf("%q", k), "must be ecdsa-p256, ecdsa-p384, ed25519 or rsa")
		}
	}
	if pol.RSAMinBits < 2048 || pol.RSAMinBits > 8192 {
		bad("rsa_min_bits", pol.RSAMinBits, "must be 2048..8192")
	}
	allowed := false
	for _, k := range pol.KeyTypes {
		allowed = allowed || k == keyType
	}
	if len(pol.KeyTypes) > 0 && !allowed {
		bad("key_types", fmt.Sprintf("%q", pol.KeyTypes), fmt.Sprintf("must include key_type %q, the key nodes generate", keyType))
	}
	if keyType == protocol.KeyRSA && pol.RSAMinBits > 2048 {
		bad("rsa_min_bits", pol.RSAMinBits, "nodes generate 2048-bit RSA keys (key_type rsa), which this would refuse")
	}
	if pol.CAFile != "" {
		if _, err := readCAFile(pol.CAFile); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// sanKind is the kind of SAN a pattern matches.
type sanKind int

const (
	sanDNS sanKind = iota
	sanIP
	sanURI
	sanEmail
)

// sanPattern is one compiled policy.san_allow entry.
type sanPattern struct {
	kind   sanKind
	glob   string       // DNS, URI and e-mail patterns, {identity} not yet replaced
	prefix netip.Prefix // IP patterns
}

// compileSANPattern classifies and checks a policy.san_allow entry.
func compileSANPattern(s string) (sanPattern, error) {
	if s == "" {
		return sanPattern{}, errors.New("empty pattern")
	}
	if len(s) > maxPatternLength {
		return sanPattern{}, fmt.Errorf("longer than %d bytes", maxPatternLength)
	}
	for _, r := range s {
		if r <= ' ' || r == 0x7f || r > 0x7e {
			return sanPattern{}, errors.New("control, space or non-ASCII character")
		}
	}
	if pfx, err := netip.ParsePrefix(s); err == nil {
		if pfx != pfx.Masked() {
			return sanPattern{}, fmt.Errorf("host bits set (did you mean %s?)", pfx.Masked())
		}
		return sanPattern{kind: sanIP, prefix: pfx}, nil
	}
	if addr, err := netip.ParseAddr(s); err == nil {
		if addr.Zone() != "" {
			return sanPattern{}, errors.New("IP zone not allowed")
		}
		return sanPattern{kind: sanIP, prefix: netip.PrefixFrom(addr, addr.BitLen())}, nil
	}
	rest := strings.ReplaceAll(s, IdentityPattern, "")
	if strings.ContainsAny(rest, "{}") {
		return sanPattern{}, fmt.Errorf("braces other than %s", IdentityPattern)
	}
	switch {
	case strings.Contains(s, "://"):
		scheme, _, _ := strings.Cut(s, "://")
		if scheme == "" || strings.ContainsAny(scheme, "*/") {
			return sanPattern{}, errors.New("URI pattern needs a literal scheme")
		}
		return sanPattern{kind: sanURI, glob: s}, nil
	case strings.Contains(s, "@"):
		if strings.Count(s, "@") != 1 {
			return sanPattern{}, errors.New("e-mail pattern needs exactly one @")
		}
		return sanPattern{kind: sanEmail, glob: strings.ToLower(s)}, nil
	}
	for i := 0; i < len(rest); i++ {
		c := rest[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.', c == '*':
		default:
			return sanPattern{}, fmt.Errorf("character %q not allowed in a DNS pattern", c)
		}
	}
	if strings.HasPrefix(s, ".") || strings.HasSuffix(s, ".") || strings.Contains(s, "..") {
		return sanPattern{}, errors.New("empty DNS label")
	}
	return sanPattern{kind: sanDNS, glob: strings.ToLower(s)}, nil
}

// matchDNS reports whether name matches a DNS pattern for identity.
func (sp sanPattern) matchString(kind sanKind, v, identity string) bool {
	if sp.kind != kind {
		return false
	}
	var sep byte
	pat := strings.ReplaceAll(sp.glob, IdentityPattern, identity)
	switch kind {
	case sanDNS:
		sep = '.'
		pat, v = strings.ToLower(pat), strings.ToLower(v)
	case sanEmail:
		sep = '@'
		pat, v = strings.ToLower(pat), strings.ToLower(v)
	case sanURI:
		sep = '/'
	default:
		return false
	}
	return globMatch(pat, v, sep)
}

// globMatch matches s against pat, where '*' stands for any run of bytes
// without sep. Because no '*' crosses sep, both split into the same number
// of sep-separated segments, matched one by one.
func globMatch(pat, s string, sep byte) bool {
	ps := strings.Split(pat, string(sep))
	ss := strings.Split(s, string(sep))
	if len(ps) != len(ss) {
		return false
	}
	for i := range ps {
		if !globSegment(ps[i], ss[i]) {
			return false
		}
	}
	return true
}

// globSegment is the classic single-star glob match (linear backtracking).
func globSegment(pat, s string) bool {
	px, sx := 0, 0
	starP, starS := -1, 0
	for sx < len(s) {
		switch {
		case px < len(pat) && pat[px] == '*':
			starP, starS = px, sx
			px++
		case px < len(pat) && pat[px] == s[sx]:
			px++
			sx++
		case starP >= 0:
			starS++
			px, sx = starP+1, starS
		default:
			return false
		}
	}
	for px < len(pat) && pat[px] == '*' {
		px++
	}
	return px == len(pat)
}

// checkSANs refuses a CSR with a SAN no pattern allows.
func (g *guard) checkSANs(csr *x509.CertificateRequest, identity string) error {
	n := len(csr.DNSNames) + len(csr.IPAddresses) + len(csr.URIs) + len(csr.EmailAddresses)
	if n > maxCSRSANs {
		return refuse(rejectSAN, "%d SANs, at most %d", n, maxCSRSANs)
	}
	matchAny := func(kind sanKind, v string) bool {
		for _, sp := range g.san {
			if sp.matchString(kind, v, identity) {
				return true
			}
		}
		return false
	}
	for _, d := range csr.DNSNames {
		if !matchAny(sanDNS, d) {
			return refuse(rejectSAN, "DNS SAN %q is not allowed by policy.san_allow", clip(d))
		}
	}
	for _, ip := range csr.IPAddresses {
		addr, ok := netip.AddrFromSlice(ip)
		allowed := false
		if ok {
			addr = addr.Unmap()
			for _, sp := range g.san {
				if sp.kind == sanIP && sp.prefix.Contains(addr) {
					allowed = true
					break
				}
			}
		}
		if !allowed {
			return refuse(rejectSAN, "IP SAN %s is not allowed by policy.san_allow", ip)
		}
	}
	for _, u := range csr.URIs {
		if !matchAny(sanURI, u.String()) {
			return refuse(rejectSAN, "URI SAN %q is not allowed by policy.san_allow", clip(u.String()))
		}
	}
	for _, e := range csr.EmailAddresses {
		if !matchAny(sanEmail, e) {
			return refuse(rejectSAN, "e-mail SAN %q is not allowed by policy.san_allow", clip(e))
		}
	}
	return nil
}

// clip bounds an untrusted value quoted in an error.
func clip(s string) string {
	if len(s) > 128 {
		return s[:128] + "…"
	}
	return s
}

// keyName names a public key's type as in policy.key_types, with its size
// for RSA.
func keyName(pub crypto.PublicKey) (string, int) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return PolicyKeyECDSAP256, 256
		case elliptic.P384():
			return PolicyKeyECDSAP384, 384
		}
		return "ecdsa-" + k.Curve.Params().Name, k.Curve.Params().BitSize
	case ed25519.PublicKey:
		return PolicyKeyEd25519, 256
	case *rsa.PublicKey:
		return PolicyKeyRSA, k.N.BitLen()
	}
	return fmt.Sprintf("%T", pub), 0
}

// checkKey refuses a key whose type or size is outside the policy.
func (g *guard) checkKey(pub crypto.PublicKey) error {
	name, bits := keyName(pub)
	if !g.keyTypes[name] {
		return refuse(rejectKey, "key type %s is not in policy.key_types", name)
	}
	if name == PolicyKeyRSA && bits < g.rsaMin {
		return refuse(rejectKey, "RSA key of %d bits, policy.rsa_min_bits is %d", bits, g.rsaMin)
	}
	return nil
}

// Fingerprint returns "sha256:" + the hex SHA-256 of pub's
// SubjectPublicKeyInfo, the key fingerprint the registry records.
func Fingerprint(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

// nodeCSR returns the CSR for this attempt: the held gencsr reply when an
// operator approved it, else a new one from the node.
func (p *Provisioner) nodeCSR(ctx context.Context, a *attempt) (*protocol.GenCSRReply, error) {
	p.mu.Lock()
	if n := p.nodes[a.id]; n != nil {
		a.approval, n.approval = n.approval, nil
	}
	p.mu.Unlock()
	if a.approval != nil && a.approval.csr != nil {
		a.log.WithField("key", a.approval.fp).Info("using the approved key of the held node")
		return a.approval.csr, nil
	}
	rep, err := p.rpc(ctx, a.id, protocol.AgentProvision, protocol.ActionGenCSR, StageGenCSR, protocol.GenCSRRequest{KeyType: p.cfg.KeyType})
	if err != nil {
		return nil, err
	}
	var g protocol.GenCSRReply
	if err := protocol.DecodeLenient(rep.Body, protocol.MaxMessageSize, &g); err != nil {
		return nil, fmt.Errorf("gencsr body: %w: %v", ErrBadReply, err)
	}
	return &g, nil
}

// checkNodeCSR applies the CSR checks and the policy to a gencsr reply and
// compares its key with the one recorded for the identity. It returns the
// node's public key.
func (p *Provisioner) checkNodeCSR(a *attempt, g *protocol.GenCSRReply) (crypto.PublicKey, error) {
	csr, pub, err := checkCSR(a.id, g)
	if err != nil {
		return nil, p.rejected(&policyError{reason: rejectCSR, err: err})
	}
	if err := p.guard.checkKey(pub); err != nil {
		return nil, p.rejected(err)
	}
	if err := p.guard.checkSANs(csr, a.id); err != nil {
		return nil, p.rejected(err)
	}
	fp, err := Fingerprint(pub)
	if err != nil {
		return nil, p.rejected(&policyError{reason: rejectKey, err: err})
	}
	a.keyFP = fp
	p.mu.Lock()
	if n := p.nodes[a.id]; n != nil {
		n.KeyFingerprint = fp
	}
	p.mu.Unlock()
	rec, ok, err := p.reg.Get(a.id)
	if err != nil {
		return nil, fmt.Errorf("identity registry: %w", err)
	}
	switch {
	case !ok:
	case rec.Denied:
		return nil, &holdError{denied: true, fp: fp}
	case rec.KeyFingerprint != "" && rec.KeyFingerprint != fp:
		if ap := a.approval; ap != nil && (ap.csr == nil || ap.fp == fp) {
			a.log.WithFields(map[string]any{"key": fp, "previous_key": rec.KeyFingerprint}).Info("changed key approved by an operator")
			break
		}
		return nil, &holdError{reason: HoldKeyChanged, fp: fp, csr: g}
	}
	return pub, nil
}

// rejected counts a policy refusal.
func (p *Provisioner) rejected(err error) error {
	var pe *policyError
	if errors.As(err, &pe) {
		p.m.policyRejections.WithLabelValues(pe.reason).Inc()
	}
	return err
}

// checkCertificate checks the certificate a helper returned: it must match
// the node's key and identity and chain to the helper's CA (when the node's
// key is known) and to policy.ca_file (when set). It records the serial on
// the attempt.
func (p *Provisioner) checkCertificate(a *attempt, req *helper.Request, rep *helper.Reply, pub crypto.PublicKey, now time.Time) error {
	classify := func(err error, what string) error {
		reason := certReason(err)
		if reason == "" {
			reason = rejectCert
		}
		if reason == rejectCertChain && what != "policy.ca_file" {
			reason = rejectCert
		}
		return fmt.Errorf("%w: certificate (checked against %s): %w", ErrHelperRejected, what, p.rejected(&policyError{reason: reason, err: err}))
	}
	// helper.ValidateReply (run first) verified the certificate against
	// the CSR's key, which checkNodeCSR showed to be pub, the identity and
	// the helper's ca. The trust anchor needs its own verification only
	// when it is not byte for byte that ca.
	var leaf *x509.Certificate
	if p.guard.caPEM != nil && !bytes.Equal(bytes.TrimSpace([]byte(rep.CA)), p.guard.caPEMTrimmed) {
		l, err := pki.VerifyLeaf([]byte(rep.Certificate), p.guard.caPEM, pub, req.Identity, now)
		if err != nil {
			return classify(err, "policy.ca_file")
		}
		leaf = l
	}
	if leaf == nil {
		certs, err := pki.ParseCertificates([]byte(rep.Certificate))
		if err != nil {
			return classify(err, "the helper's ca")
		}
		leaf = certs[0]
	}
	if leaf != nil {
		a.serial = leaf.SerialNumber.Text(16)
	}
	return nil
}

// certReason is the rejection reason of a certificate check error, "" for
// an error that is not about the certificate.
func certReason(err error) string {
	switch {
	case errors.Is(err, pki.ErrKeyMismatch):
		return rejectCertKey
	case errors.Is(err, pki.ErrIdentityMismatch):
		return rejectCertIdentity
	case errors.Is(err, pki.ErrUntrusted):
		return rejectCertChain
	case errors.Is(err, pki.ErrExpired), errors.Is(err, pki.ErrBadPEM):
		return rejectCert
	}
	return ""
}

// helperRejected wraps a helper contract failure; one about the certificate
// (helper.ValidateReply checks it against the CSR's key and the helper's
// CA) counts as a policy rejection.
func (p *Provisioner) helperRejected(err error) error {
	reason := certReason(err)
	if reason == rejectCertChain {
		reason = rejectCert // the helper's own CA, not the trust anchor
	}
	if reason != "" {
		err = p.rejected(&policyError{reason: reason, err: err})
	}
	return fmt.Errorf("%w: %w", ErrHelperRejected, err)
}

// stillClear stops an attempt before configure when the node was held or
// denied while it ran (Hold from another part of the provisioner).
func (p *Provisioner) stillClear(a *attempt) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.nodes[a.id]
	if n == nil {
		return nil
	}
	switch n.State {
	case StateHeld:
		return &holdError{reason: n.HoldReason}
	case StateDenied:
		return &holdError{denied: true}
	}
	return nil
}

// applyHold settles a finished attempt of a held or denied node; p.mu is
// held. It reports whether the node is held or denied.
func (p *Provisioner) applyHold(n *node, err error, now time.Time) bool {
	if n.State == StateHeld || n.State == StateDenied {
		// Held or denied while the attempt ran.
		n.RetryAt = time.Time{}
		return true
	}
	var he *holdError
	if !errors.As(err, &he) {
		return false
	}
	n.RetryAt = time.Time{}
	n.LastError = he.Error()
	if he.denied {
		p.setState(n, StateDenied)
		return true
	}
	p.setState(n, StateHeld)
	n.HoldReason = he.reason
	n.HeldAt = now
	n.heldCSR = nil
	if he.csr != nil {
		n.heldCSR = &approval{csr: he.csr, fp: he.fp}
	}
	return true
}

// recordConfigured records a configured node's key, certificate serial and
// token in the registry, once the node acknowledged configure (its disk
// holds them from then on). A failed write is retried (a replicated
// registry refuses writes while it elects a leader) until ctx ends or
// registryRetryFor passed; then the attempt must not go on to restart the
// node: left waiting in provisioning mode, it is run again and recorded
// then.
func (p *Provisioner) recordConfigured(ctx context.Context, a *attempt) error {
	now := time.Now().UTC()
	p.mu.Lock()
	if n := p.nodes[a.id]; n != nil {
		n.HoldReason = ""
		n.HeldAt = time.Time{}
		n.heldCSR = nil
		// The life configured: another life's announcement after the
		// node's arrival is a reinstall.
		n.Life = a.life
	}
	p.mu.Unlock()
	rec := Record{Identity: a.id, KeyFingerprint: a.keyFP, Serial: a.serial, ProvisionedAt: now, TokenID: a.tokenID}
	if err := p.putRegistry(ctx, rec, a.log); err != nil {
		return fmt.Errorf("identity registry: record the configured key: %w", err)
	}
	p.recordTokenUse(a.tokenID, a.id)
	return nil
}

// registryRetryFor bounds the retries of a registry write.
const registryRetryFor = 30 * time.Second

// putRegistry writes rec, retrying with backoff until ctx ends or
// registryRetryFor passed.
func (p *Provisioner) putRegistry(ctx context.Context, rec Record, log *logrus.Entry) error {
	deadline := time.Now().Add(registryRetryFor)
	wait := rpcBackoffBase
	for {
		err := p.reg.Put(rec)
		if err == nil {
			return nil
		}
		if rec.validate() != nil || time.Now().Add(wait).After(deadline) {
			return err
		}
		log.WithError(err).Warn("identity registry write failed; retrying")
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// Hold holds a node for an operator's decision with reason (such as
// HoldDuplicateConnection): it is not provisioned or retried until
// approved with Approve or denied with Deny. A node in progress is stopped
// before configure. The reason must be a short word of letters, digits and
// '_'.
func (p *Provisioner) Hold(identity, reason string) error {
	if err := protocol.ValidateIdentity(identity); err != nil {
		return fmt.Errorf("hold: %w", err)
	}
	if !validReason(reason) {
		return fmt.Errorf("hold %s: reason %q: must be 1..64 of a-z, 0-9 and _", identity, clip(reason))
	}
	now := time.Now()
	p.mu.Lock()
	n := p.nodes[identity]
	if n == nil {
		n = p.addNode(identity)
	}
	if n.State == StateDenied || n.State == StateHeld {
		p.mu.Unlock()
		return nil
	}
	p.setState(n, StateHeld)
	n.HoldReason = reason
	n.HeldAt = now
	n.Updated = now
	n.RetryAt = time.Time{}
	n.LastError = fmt.Sprintf("%v: %s", ErrHeld, reason)
	n.heldCSR = nil
	p.mu.Unlock()
	p.log.WithFields(map[string]any{"identity": identity, "reason": reason}).Warn("node held")
	return nil
}

func validReason(r string) bool {
	if r == "" || len(r) > 64 {
		return false
	}
	for i := 0; i < len(r); i++ {
		c := r[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// Approve lets a held node be provisioned: it is queued at once and its
// next attempt uses the key that was held (or, for a hold without a key,
// whatever key it presents); that key is then recorded. It returns
// ErrUnknownNode or ErrNotHeld, or ErrQueueFull when the queue has no room
// (the node stays held).
func (p *Provisioner) Approve(identity string) error {
	now := time.Now()
	p.mu.Lock()
	n := p.nodes[identity]
	if n == nil {
		p.mu.Unlock()
		return fmt.Errorf("approve %s: %w", identity, ErrUnknownNode)
	}
	if n.State != StateHeld {
		st := n.State
		p.mu.Unlock()
		return fmt.Errorf("approve %s: %w (state %s)", identity, ErrNotHeld, st)
	}
	select {
	case p.queue <- queueItem{identity: identity, queuedAt: now}:
	default:
		p.mu.Unlock()
		return fmt.Errorf("approve %s: %w", identity, ErrQueueFull)
	}
	ap := n.heldCSR
	if ap == nil {
		ap = &approval{}
	}
	n.approval = ap
	n.heldCSR = nil
	reason := n.HoldReason
	p.setState(n, StateQueued)
	n.HoldReason = ""
	n.HeldAt = time.Time{}
	n.LastError = ""
	n.Source = "approval"
	n.Updated = now
	n.queuedAt = now
	p.mu.Unlock()
	p.log.WithFields(map[string]any{"identity": identity, "reason": reason, "key": ap.fp}).Warn("held node approved by an operator")
	return nil
}

// Deny refuses a held node for good: it is never provisioned, and the
// denial is recorded in the registry so it survives a restart. The node is
// denied even when recording fails (the error says so).
func (p *Provisioner) Deny(identity string) error {
	now := time.Now()
	p.mu.Lock()
	n := p.nodes[identity]
	if n == nil {
		p.mu.Unlock()
		return fmt.Errorf("deny %s: %w", identity, ErrUnknownNode)
	}
	if n.State != StateHeld {
		st := n.State
		p.mu.Unlock()
		return fmt.Errorf("deny %s: %w (state %s)", identity, ErrNotHeld, st)
	}
	fp := n.KeyFingerprint
	reason := n.HoldReason
	p.setState(n, StateDenied)
	n.LastError = ErrDenied.Error()
	n.heldCSR = nil
	n.approval = nil
	n.Updated = now
	p.mu.Unlock()
	p.log.WithFields(map[string]any{"identity": identity, "reason": reason, "key": fp}).Warn("held node denied by an operator")

	rec, ok, err := p.reg.Get(identity)
	if err != nil {
		return fmt.Errorf("deny %s: denied until restart, not recorded: %w", identity, err)
	}
	if !ok {
		rec = Record{Identity: identity}
	}
	rec.Denied = true
	rec.DeniedKey = fp
	rec.DeniedAt = now.UTC()
	if err := p.reg.Put(rec); err != nil {
		return fmt.Errorf("deny %s: denied until restart, not recorded: %w", identity, err)
	}
	return nil
}

// HeldNodes returns the held nodes' status, sorted by identity.
func (p *Provisioner) HeldNodes() []NodeStatus {
	var out []NodeStatus
	p.mu.Lock()
	for _, n := range p.nodes {
		if n.State == StateHeld {
			out = append(out, n.NodeStatus)
		}
	}
	p.mu.Unlock()
	sortNodes(out)
	return out
}

// NodeDetail is one node's status with its registry record (GET
// /nodes/{id}).
type NodeDetail struct {
	NodeStatus
	// Registered is what the identity registry holds for it, if anything.
	Registered *Record `json:"registered,omitempty"`
}

// Node returns one node's status and registry record; ok is false when
// neither exists.
func (p *Provisioner) Node(identity string) (NodeDetail, bool, error) {
	var d NodeDetail
	p.mu.Lock()
	n := p.nodes[identity]
	if n != nil {
		d.NodeStatus = n.NodeStatus
	}
	p.mu.Unlock()
	rec, ok, err := p.reg.Get(identity)
	if err != nil {
		return d, n != nil, err
	}
	if ok {
		d.Registered = &rec
		if n == nil {
			d.Identity = identity
		}
	}
	return d, n != nil || ok, nil
}

// loadDenied marks the identities the registry denies, so they show as
// denied and are never queued.
func (p *Provisioner) loadDenied() error {
	recs, err := p.reg.List()
	if err != nil {
		return err
	}
	for _, r := range recs {
		if r.TokenID != "" {
			p.recordTokenUse(r.TokenID, r.Identity)
		}
		if !r.Denied {
			continue
		}
		n := p.addNode(r.Identity)
		p.setState(n, StateDenied)
		n.LastError, n.KeyFingerprint, n.Updated = ErrDenied.Error(), r.DeniedKey, r.DeniedAt
	}
	return nil
}
