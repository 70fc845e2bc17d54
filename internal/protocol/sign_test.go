package protocol

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"
)

func signedRequest(t testing.TB, kp KeySigner) *Request {
	t.Helper()
	r := &Request{
		Protocol: RequestProtocol, ID: "req-1", Sender: "prov", Target: "n1.example.net",
		Agent: AgentProvision, Action: ActionConfigure, Time: time.Now().UTC(), TTL: 60,
		Body: json.RawMessage(`{"configuration":{"a":"b"}}`),
	}
	if err := r.Sign(kp); err != nil {
		t.Fatal(err)
	}
	return r
}

func newKey(t testing.TB) (nkeys.KeyPair, string) {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	return kp, pub
}

func TestSignVerify(t *testing.T) {
	oldKey, oldPub := newKey(t)
	newK, newPub := newKey(t)
	rogue, _ := newKey(t)
	// Rotation: both keys trusted at once.
	trusted, err := NewKeySet([]string{oldPub, newPub})
	if err != nil || trusted.Len() != 2 {
		t.Fatalf("key set: %v", err)
	}
	for _, kp := range []nkeys.KeyPair{oldKey, newK} {
		r := signedRequest(t, kp)
		// Survives an encode/decode round trip.
		data, _ := json.Marshal(r)
		got, err := DecodeRequest(data)
		if err != nil {
			t.Fatal(err)
		}
		if err := got.VerifySignature(trusted); err != nil {
			t.Fatalf("verify: %v", err)
		}
	}
	tamper := map[string]func(*Request){
		"id":       func(r *Request) { r.ID = "req-2" },
		"sender":   func(r *Request) { r.Sender = "other" },
		"target":   func(r *Request) { r.Target = "n2.example.net" },
		"agent":    func(r *Request) { r.Agent = AgentRPCUtil },
		"action":   func(r *Request) { r.Action = ActionRestart },
		"time":     func(r *Request) { r.Time = r.Time.Add(time.Nanosecond) },
		"ttl":      func(r *Request) { r.TTL = 61 },
		"body":     func(r *Request) { r.Body = json.RawMessage(`{"configuration":{"a":"c"}}`) },
		"protocol": func(r *Request) { r.Protocol = "muster:request:2" },
	}
	for name, mut := range tamper {
		r := signedRequest(t, newK)
		mut(r)
		if err := r.VerifySignature(trusted); !errors.Is(err, ErrBadSignature) {
			t.Errorf("tampered %s: %v, want ErrBadSignature", name, err)
		}
	}
	if err := signedRequest(t, rogue).VerifySignature(trusted); !errors.Is(err, ErrUntrustedKey) {
		t.Errorf("rogue key: %v", err)
	}
	r := signedRequest(t, rogue)
	r.Signer = newPub // claims a trusted key, signature by another
	if err := r.VerifySignature(trusted); !errors.Is(err, ErrBadSignature) {
		t.Errorf("claimed signer: %v", err)
	}
	r = signedRequest(t, newK)
	r.Signer, r.Signature = "", ""
	if err := r.VerifySignature(trusted); !errors.Is(err, ErrUnsigned) {
		t.Errorf("unsigned: %v", err)
	}
	if _, err := NewKeySet([]string{"SUABC", "not-a-key"}); err == nil {
		t.Error("bad keys accepted")
	}
}

func FuzzVerifySignature(f *testing.F) {
	kp, pub := newKey(f)
	trusted, _ := NewKeySet([]string{pub})
	good, _ := json.Marshal(signedRequest(f, kp))
	f.Add(good)
	f.Add([]byte(`{"protocol":"muster:request:1","id":"x","agent":"a","action":"b","time":"2026-01-01T00:00:00Z","ttl":1,"signer":"UABC","sig":"AAAA"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := DecodeRequest(data)
		if err != nil {
			return
		}
		if r.VerifySignature(trusted) == nil && string(data) != string(good) {
			// Only the request kp signed may verify; a different encoding of
			// the same fields is fine, different fields are not.
			g, _ := DecodeRequest(good)
			if string(r.SigningPayload()) != string(g.SigningPayload()) {
				t.Fatalf("forged request verified: %s", data)
			}
		}
	})
}

func FuzzDecodeDuplicateIdentity(f *testing.F) {
	f.Add([]byte(`{"protocol":"muster:advisory:1","identity":"n1","time":"2026-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"identity":"../x"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := DecodeDuplicateIdentity(data)
		if err == nil && ValidateIdentity(d.Identity) != nil {
			t.Fatalf("accepted identity %q", d.Identity)
		}
	})
}

func TestSignerMatchesKeyPair(t *testing.T) {
	kp, pub := newKey(t)
	s, err := NewSigner(kp)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := s.PublicKey(); got != pub {
		t.Fatalf("public key %q, want %q", got, pub)
	}
	a, b := signedRequest(t, kp), signedRequest(t, s)
	b.Time = a.Time
	if err := b.Sign(s); err != nil {
		t.Fatal(err)
	}
	// ed25519 is deterministic: the same payload gives the same signature.
	if a.Signature != b.Signature {
		t.Fatal("Signer and KeyPair signatures differ")
	}
	trusted, _ := NewKeySet([]string{pub})
	if err := b.VerifySignature(trusted); err != nil {
		t.Fatal(err)
	}
	pubOnly, _ := nkeys.FromPublicKey(pub)
	if _, err := NewSigner(pubOnly); err == nil {
		t.Fatal("NewSigner accepted a key pair without a seed")
	}
}

// TestSignNonce: a broker can get the provisioner's key to sign its nonce,
// never a request's signing payload.
func TestSignNonce(t *testing.T) {
	kp, _ := nkeys.CreateUser()
	r := &Request{Protocol: RequestProtocol, ID: "x", Sender: "p", Target: "n1", Agent: AgentProvision, Action: ActionConfigure, Time: time.Now().UTC(), TTL: 60}
	for name, nonce := range map[string][]byte{
		"signing payload": r.SigningPayload(),
		"empty":           nil,
		"too long":        []byte(strings.Repeat("a", MaxNonce+1)),
		"one line":        []byte("muster-request-signature:1"),
	} {
		if sig, err := SignNonce(kp, nonce); !errors.Is(err, ErrBadNonce) || sig != nil {
			t.Errorf("%s: signed (%v)", name, err)
		}
	}
	for _, nonce := range []string{"qHv7lmtmb1UHWak", "abc-_+/=", "AAAAAAAAAAA"} {
		sig, err := SignNonce(kp, []byte(nonce))
		if err != nil || kp.Verify([]byte(nonce), sig) != nil {
			t.Errorf("nonce %q: %v", nonce, err)
		}
	}
}
