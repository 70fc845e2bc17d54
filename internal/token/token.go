// Package token issues and verifies Muster provisioning tokens.
//
// A provisioning token is a JWT (RFC 7519) signed with EdDSA (ed25519) by a
// token issuer key. The issuer key is an nkey account seed ("SA…"); its public
// key ("A…") is the token's iss claim and is what brokers and provisioners
// list as trusted issuers. A node presents its token to the provisioning
// broker when it connects and in its inventory; the broker admits and the
// provisioner provisions only holders of a valid token whose scope covers
// the node's identity. The verified claims reach the helper as its "jwt"
// input.
//
// Scope claims: an exact identity, or an identity glob pattern, an optional
// batch label and an optional maximum number of distinct identities the
// token may provision. Trust claims a node may take from its token: the
// provisioning brokers, the pin of the broker CA and the provisioner keys it
// should trust.
package token

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"

	"github.com/muster-io/muster/internal/protocol"
)

// MaxSize bounds an encoded token. Anything longer is refused before it is
// parsed.
const MaxSize = 4096

// DefaultLeeway is the clock skew allowed on exp, nbf and iat.
const DefaultLeeway = 2 * time.Minute

// Sentinel errors.
var (
	ErrInvalid        = errors.New("invalid provisioning token")
	ErrExpired        = errors.New("provisioning token expired")
	ErrUnknownIssuer  = errors.New("provisioning token from an unknown issuer")
	ErrOutOfScope     = errors.New("identity outside the provisioning token's scope")
	ErrBadIssuerSeed  = errors.New("not an nkey account seed")
	ErrMissingToken   = errors.New("no provisioning token")
	ErrTooManyUses    = errors.New("provisioning token used up")
	errMethodMismatch = errors.New("signing method is not EdDSA")
)

// Scope is Muster's private claim set.
type Scope struct {
	// Identity, when set, is the one identity the token is for.
	Identity string `json:"identity,omitempty"`
	// Pattern, when set, is a glob identities must match: path.Match syntax
	// per DNS label, so '*' never crosses a '.' ("web-*.example.net" holds
	// web-1.example.net, not web-1.evil.example.net).
	Pattern string `json:"identity_pattern,omitempty"`
	// Batch is a free label (a rack, an order number) passed to the helper.
	Batch string `json:"batch,omitempty"`
	// MaxUses, when > 0, is how many distinct identities the token may
	// provision.
	MaxUses int `json:"max_uses,omitempty"`
	// ProvisionerKeys are provisioner public nkeys the node should trust.
	ProvisionerKeys []string `json:"provisioner_keys,omitempty"`
	// Brokers are provisioning broker URLs for the node.
	Brokers []string `json:"brokers,omitempty"`
	// CAPin is "sha256:<hex>" of the provisioning broker CA's public key.
	CAPin string `json:"ca_pin,omitempty"`
}

// Claims are a provisioning token's claims.
type Claims struct {
	jwt.RegisteredClaims
	Muster Scope `json:"muster"`
}

// Validate checks the scope claims' syntax.
func (s Scope) Validate() error {
	var errs []error
	if s.Identity != "" {
		if err := protocol.ValidateIdentity(s.Identity); err != nil {
			errs = append(errs, fmt.Errorf("identity: %w", err))
		}
	}
	if s.Pattern != "" {
		if _, err := path.Match(s.Pattern, "x"); err != nil || len(s.Pattern) > protocol.MaxIdentityLength {
			errs = append(errs, fmt.Errorf("identity_pattern %q: not a valid glob", s.Pattern))
		}
	}
	if s.Identity != "" && s.Pattern != "" {
		errs = append(errs, errors.New("identity and identity_pattern are exclusive"))
	}
	if s.MaxUses < 0 {
		errs = append(errs, fmt.Errorf("max_uses %d: must not be negative", s.MaxUses))
	}
	if len(s.Batch) > 128 || strings.ContainsAny(s.Batch, "\r\n") {
		errs = append(errs, errors.New("batch: at most 128 bytes, no newlines"))
	}
	if _, err := protocol.NewKeySet(s.ProvisionerKeys); err != nil {
		errs = append(errs, err)
	}
	if len(s.Brokers) > 32 {
		errs = append(errs, errors.New("brokers: at most 32"))
	}
	for _, b := range s.Brokers {
		if b == "" || len(b) > 256 || strings.ContainsAny(b, " \r\n,") {
			errs = append(errs, fmt.Errorf("broker %q: not a URL", b))
		}
	}
	if s.CAPin != "" && (!strings.HasPrefix(s.CAPin, "sha256:") || len(s.CAPin) != len("sha256:")+64) {
		errs = append(errs, fmt.Errorf("ca_pin %q: want sha256:<64 hex digits>", s.CAPin))
	}
	return errors.Join(errs...)
}

// Allows reports whether the scope covers identity.
func (s Scope) Allows(identity string) error {
	switch {
	case s.Identity != "" && s.Identity != identity:
		return fmt.Errorf("%w: token is for %q", ErrOutOfScope, s.Identity)
	case s.Pattern != "":
		if !matchLabels(s.Pattern, identity) {
			return fmt.Errorf("%w: %q does not match %q", ErrOutOfScope, identity, s.Pattern)
		}
	}
	return nil
}

// matchLabels matches identity against pattern label by label.
func matchLabels(pattern, identity string) bool {
	ps, is := strings.Split(pattern, "."), strings.Split(identity, ".")
	if len(ps) != len(is) {
		return false
	}
	for i := range ps {
		if ok, err := path.Match(ps[i], is[i]); err != nil || !ok {
			return false
		}
	}
	return true
}

// Issuer signs tokens with an nkey account seed.
type Issuer struct {
	pub  string
	priv ed25519.PrivateKey
}

// NewIssuer reads an nkey account seed ("SA…").
func NewIssuer(seed []byte) (*Issuer, error) {
	kp, err := nkeys.FromSeed([]byte(strings.TrimSpace(string(seed))))
	if err != nil {
		return nil, ErrBadIssuerSeed
	}
	pub, err := kp.PublicKey()
	if err != nil || !nkeys.IsValidPublicAccountKey(pub) {
		return nil, ErrBadIssuerSeed
	}
	raw, err := kp.Seed()
	if err != nil {
		return nil, ErrBadIssuerSeed
	}
	_, rawSeed, err := nkeys.DecodeSeed(raw)
	if err != nil || len(rawSeed) != ed25519.SeedSize {
		return nil, ErrBadIssuerSeed
	}
	return &Issuer{pub: pub, priv: ed25519.NewKeyFromSeed(rawSeed)}, nil
}

// PublicKey is the issuer's public nkey, the tokens' iss claim.
func (i *Issuer) PublicKey() string { return i.pub }

// Create signs a token with scope, valid from now for ttl (which must be
// positive). Subject defaults to the scope's identity or pattern.
func (i *Issuer) Create(scope Scope, now time.Time, ttl time.Duration) (string, *Claims, error) {
	if err := scope.Validate(); err != nil {
		return "", nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if ttl <= 0 {
		return "", nil, fmt.Errorf("%w: validity must be positive", ErrInvalid)
	}
	sub := scope.Identity
	if sub == "" {
		sub = scope.Pattern
	}
	c := &Claims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer:    i.pub,
			Subject:   sub,
			ID:        nuid.Next(),
			IssuedAt:  jwt.NewNumericDate(now),
			NotBefore: jwt.NewNumericDate(now),
			ExpiresAt: jwt.NewNumericDate(now.Add(ttl)),
		},
		Muster: scope,
	}
	s, err := jwt.NewWithClaims(jwt.SigningMethodEdDSA, c).SignedString(i.priv)
	if err != nil {
		return "", nil, fmt.Errorf("sign token: %w", err)
	}
	if len(s) > MaxSize {
		return "", nil, fmt.Errorf("%w: %d bytes, limit %d", ErrInvalid, len(s), MaxSize)
	}
	return s, c, nil
}

// Verifier checks tokens against a set of trusted issuers.
type Verifier struct {
	issuers map[string]ed25519.PublicKey
	leeway  time.Duration
}

// NewVerifier trusts the given issuer public nkeys ("A…").
func NewVerifier(issuers []string) (*Verifier, error) {
	v := &Verifier{issuers: make(map[string]ed25519.PublicKey, len(issuers)), leeway: DefaultLeeway}
	var errs []error
	for _, k := range issuers {
		k = strings.TrimSpace(k)
		if !nkeys.IsValidPublicAccountKey(k) {
			errs = append(errs, fmt.Errorf("token issuer %q: not a public account nkey", k))
			continue
		}
		raw, err := nkeys.Decode(nkeys.PrefixByteAccount, []byte(k))
		if err != nil || len(raw) != ed25519.PublicKeySize {
			errs = append(errs, fmt.Errorf("token issuer %q: %v", k, err))
			continue
		}
		v.issuers[k] = ed25519.PublicKey(raw)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return v, nil
}

// Len is the number of trusted issuers.
func (v *Verifier) Len() int {
	if v == nil {
		return 0
	}
	return len(v.issuers)
}

// Verify checks the token's size, signature, issuer, exp/nbf/iat at now and
// claim syntax, and that its scope covers identity (skipped when identity
// is empty). It never includes the token in its errors.
func (v *Verifier) Verify(tok, identity string, now time.Time) (*Claims, error) {
	if tok == "" {
		return nil, ErrMissingToken
	}
	if len(tok) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrInvalid, len(tok), MaxSize)
	}
	var c Claims
	p := jwt.NewParser(
		jwt.WithValidMethods([]string{jwt.SigningMethodEdDSA.Alg()}),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(v.leeway),
		jwt.WithTimeFunc(func() time.Time { return now }),
	)
	_, err := p.ParseWithClaims(tok, &c, func(t *jwt.Token) (any, error) {
		if _, ok := t.Method.(*jwt.SigningMethodEd25519); !ok {
			return nil, errMethodMismatch
		}
		key, ok := v.issuers[c.Issuer]
		if !ok {
			return nil, ErrUnknownIssuer
		}
		return key, nil
	})
	switch {
	case err == nil:
	case errors.Is(err, ErrUnknownIssuer):
		return nil, ErrUnknownIssuer
	case errors.Is(err, jwt.ErrTokenExpired):
		return nil, ErrExpired
	case errors.Is(err, jwt.ErrTokenNotValidYet), errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return nil, fmt.Errorf("%w: not valid yet", ErrInvalid)
	default:
		return nil, fmt.Errorf("%w: %s", ErrInvalid, shortReason(err))
	}
	if c.ID == "" || len(c.ID) > 64 {
		return nil, fmt.Errorf("%w: jti missing or too long", ErrInvalid)
	}
	if err := c.Muster.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if identity != "" {
		if err := c.Muster.Allows(identity); err != nil {
			return nil, err
		}
	}
	return &c, nil
}

// shortReason turns a jwt error into a short reason without token bytes.
func shortReason(err error) string {
	switch {
	case errors.Is(err, jwt.ErrTokenMalformed):
		return "malformed"
	case errors.Is(err, jwt.ErrTokenSignatureInvalid), errors.Is(err, errMethodMismatch):
		return "bad signature"
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return "required claim missing"
	}
	return "rejected"
}

// Inspect decodes a token's claims WITHOUT verifying its signature. Agents
// use it to read the trust settings in the token they were given (they hold
// no issuer key; the token's authenticity is checked by the broker and the
// provisioner), and `muster token view` shows a token with it.
func Inspect(tok string) (*Claims, error) {
	if len(tok) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrInvalid, len(tok), MaxSize)
	}
	var c Claims
	if _, _, err := jwt.NewParser().ParseUnverified(tok, &c); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrInvalid, shortReason(err))
	}
	if err := c.Muster.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return &c, nil
}

// GenerateIssuerSeed makes a new issuer key: an nkey account seed.
func GenerateIssuerSeed() (seed []byte, pub string, err error) {
	kp, err := nkeys.CreateAccount()
	if err != nil {
		return nil, "", err
	}
	seed, err = kp.Seed()
	if err != nil {
		return nil, "", err
	}
	pub, err = kp.PublicKey()
	return seed, pub, err
}
