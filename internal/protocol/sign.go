package protocol

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nkeys"
)

// Request signatures. The provisioner signs every request it sends (broadcast
// discovery aside) with its nkey, an ed25519 key. The signature covers every
// field a receiver acts on: the envelope's protocol, id, sender, target,
// agent, action, time, ttl and the SHA-256 of the body, so a captured request
// cannot be altered, re-addressed to another node or made younger. Replays of
// an unaltered request within its TTL are stopped by the receiver's
// request-id cache.

// SignatureContext starts every signed payload, so a signature over a
// request can never be mistaken for one over anything else the key signs
// (for example the broker's connection nonce).
const SignatureContext = "muster-request-signature:1"

// Signature errors.
var (
	ErrUnsigned     = errors.New("request is not signed")
	ErrBadSignature = errors.New("bad request signature")
	ErrUntrustedKey = errors.New("request signed by an untrusted key")
)

// MaxNonce bounds a connection nonce SignNonce signs. nats-server sends 11
// characters.
const MaxNonce = 64

// ErrBadNonce is returned by SignNonce for a nonce it will not sign.
var ErrBadNonce = errors.New("refusing to sign a server nonce that is not a nonce")

// SignNonce signs a broker's connection nonce with the provisioner's key,
// which is also the key requests are signed with. The broker chooses the
// nonce, so a rogue or compromised broker (or whoever sits between a
// provisioner and a plaintext broker) could send a request's signing
// payload as its "nonce" and get a valid request signature back. A real
// nonce is a short run of base64 characters; a signing payload always has
// newlines and colons, so SignNonce refuses anything that is not base64,
// empty, or longer than MaxNonce.
func SignNonce(kp KeySigner, nonce []byte) ([]byte, error) {
	if len(nonce) == 0 || len(nonce) > MaxNonce {
		return nil, fmt.Errorf("%w: %d bytes", ErrBadNonce, len(nonce))
	}
	for _, c := range nonce {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '+' || c == '/' || c == '=') {
			return nil, fmt.Errorf("%w: byte %q", ErrBadNonce, c)
		}
	}
	return kp.Sign(nonce)
}

// SigningPayload returns the bytes a request's signature covers.
func (r *Request) SigningPayload() []byte {
	sum := sha256.Sum256(r.Body)
	var b strings.Builder
	b.Grow(len(SignatureContext) + len(r.ID) + len(r.Sender) + len(r.Target) + len(r.Agent) + len(r.Action) + 180)
	for _, f := range []string{
		SignatureContext, r.Protocol, r.ID, r.Sender, r.Target, r.Agent, r.Action,
		r.Time.UTC().Format(time.RFC3339Nano), strconv.Itoa(r.TTL), hex.EncodeToString(sum[:]),
	} {
		b.WriteString(f)
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

// KeySigner is what signs requests: an nkeys.KeyPair, or a Signer made from
// one (cheaper per signature).
type KeySigner interface {
	PublicKey() (string, error)
	Sign(input []byte) ([]byte, error)
}

// Signer signs with an nkey's ed25519 key, decoded once. An nkeys.KeyPair
// re-derives its key from the seed on every signature (an extra scalar
// multiplication); the provisioner signs every request it sends, so it keeps
// a Signer.
type Signer struct {
	pub string
	key ed25519.PrivateKey
}

// NewSigner decodes kp's seed once. kp must hold a seed.
func NewSigner(kp nkeys.KeyPair) (*Signer, error) {
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("signer: %w", err)
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, fmt.Errorf("signer: %w", err)
	}
	_, raw, err := nkeys.DecodeSeed(seed) // seed is kp's own: kp.Wipe clears it
	if err != nil {
		return nil, fmt.Errorf("signer: %w", err)
	}
	if len(raw) != ed25519.SeedSize {
		clear(raw)
		return nil, fmt.Errorf("signer: seed of %d bytes", len(raw))
	}
	s := &Signer{pub: pub, key: ed25519.NewKeyFromSeed(raw)}
	clear(raw)
	return s, nil
}

// PublicKey returns the public nkey.
func (s *Signer) PublicKey() (string, error) { return s.pub, nil }

// Sign returns the ed25519 signature over input (what kp.Sign would return).
func (s *Signer) Sign(input []byte) ([]byte, error) { return ed25519.Sign(s.key, input), nil }

// Sign sets Signer to kp's public key and Signature to kp's signature over
// SigningPayload. The request must not change afterwards.
func (r *Request) Sign(kp KeySigner) error {
	pub, err := kp.PublicKey()
	if err != nil {
		return fmt.Errorf("sign request: %w", err)
	}
	r.Signer = pub
	sig, err := kp.Sign(r.SigningPayload())
	if err != nil {
		return fmt.Errorf("sign request: %w", err)
	}
	r.Signature = base64.RawURLEncoding.EncodeToString(sig)
	return nil
}

// VerifySignature checks that the request is signed by one of the trusted
// keys and that the signature covers its current content.
func (r *Request) VerifySignature(trusted *KeySet) error {
	if r.Signer == "" || r.Signature == "" {
		return ErrUnsigned
	}
	kp := trusted.lookup(r.Signer)
	if kp == nil {
		return fmt.Errorf("%w: %s", ErrUntrustedKey, r.Signer)
	}
	sig, err := base64.RawURLEncoding.DecodeString(r.Signature)
	if err != nil || len(sig) != 64 {
		return fmt.Errorf("%w: malformed", ErrBadSignature)
	}
	if err := kp.Verify(r.SigningPayload(), sig); err != nil {
		return ErrBadSignature
	}
	return nil
}

// KeySet is a set of trusted public nkeys. Several keys are trusted at once
// so a provisioner key can be rotated: trust old and new, switch the
// provisioner, then drop the old key.
type KeySet struct {
	keys map[string]nkeys.KeyPair
}

// NewKeySet parses public nkeys (user keys, "U…", as the provisioner's nkey
// is a user key; account keys "A…" are accepted too). It reports every key it
// cannot parse.
func NewKeySet(pubs []string) (*KeySet, error) {
	ks := &KeySet{keys: make(map[string]nkeys.KeyPair, len(pubs))}
	var errs []error
	for _, p := range pubs {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		if !nkeys.IsValidPublicUserKey(p) && !nkeys.IsValidPublicAccountKey(p) {
			errs = append(errs, fmt.Errorf("trusted key %q: not a public user or account nkey", p))
			continue
		}
		kp, err := nkeys.FromPublicKey(p)
		if err != nil {
			errs = append(errs, fmt.Errorf("trusted key %q: %w", p, err))
			continue
		}
		ks.keys[p] = kp
	}
	return ks, errors.Join(errs...)
}

// Len is the number of trusted keys.
func (ks *KeySet) Len() int {
	if ks == nil {
		return 0
	}
	return len(ks.keys)
}

// Keys returns the trusted public keys.
func (ks *KeySet) Keys() []string {
	if ks == nil {
		return nil
	}
	out := make([]string, 0, len(ks.keys))
	for k := range ks.keys {
		out = append(out, k)
	}
	return out
}

func (ks *KeySet) lookup(pub string) nkeys.KeyPair {
	if ks == nil {
		return nil
	}
	return ks.keys[pub]
}
