package token

import (
	"encoding/base64"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

func newIssuer(t testing.TB) *Issuer {
	t.Helper()
	seed, _, err := GenerateIssuerSeed()
	if err != nil {
		t.Fatal(err)
	}
	iss, err := NewIssuer(seed)
	if err != nil {
		t.Fatal(err)
	}
	return iss
}

func TestCreateVerify(t *testing.T) {
	iss := newIssuer(t)
	other := newIssuer(t)
	now := time.Now()
	v, err := NewVerifier([]string{iss.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	mk := func(s Scope, ttl time.Duration) string {
		t.Helper()
		tok, _, err := iss.Create(s, now, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	otherTok, _, err := other.Create(Scope{}, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	good := mk(Scope{Pattern: "web-*.example.net", Batch: "rack12", MaxUses: 3}, time.Hour)
	parts := strings.Split(good, ".")
	// Same header and signature, claims rewritten to widen the scope.
	forged := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(`{"iss":"`+iss.PublicKey()+`","jti":"x","exp":9999999999,"iat":1,"muster":{}}`)) + "." + parts[2]
	// alg=none and HMAC-with-public-key confusion.
	none, _ := jwt.NewWithClaims(jwt.SigningMethodNone, Claims{RegisteredClaims: jwt.RegisteredClaims{Issuer: iss.PublicKey(), ID: "x", ExpiresAt: jwt.NewNumericDate(now.Add(time.Hour))}}).SignedString(jwt.UnsafeAllowNoneSignatureType)
	hs, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, Claims{RegisteredClaims: jwt.RegisteredClaims{Issuer: iss.PublicKey(), ID: "x", ExpiresAt: jwt.NewNumericDate(now.Add(time.Hour))}}).SignedString([]byte(iss.PublicKey()))

	cases := []struct {
		name     string
		tok      string
		identity string
		at       time.Time
		want     error
	}{
		{"in pattern", good, "web-1.example.net", now, nil},
		{"outside pattern", good, "db-1.example.net", now, ErrOutOfScope},
		// '*' stands within one label, as in SAN patterns.
		{"pattern, extra label", good, "web-1.evil.example.net", now, ErrOutOfScope},
		{"pattern, label swallowed", mk(Scope{Pattern: "*.example.net"}, time.Hour), "a.b.example.net", now, ErrOutOfScope},
		{"pattern, one label", mk(Scope{Pattern: "*.example.net"}, time.Hour), "a.example.net", now, nil},
		{"exact identity", mk(Scope{Identity: "n1"}, time.Hour), "n1", now, nil},
		{"other identity", mk(Scope{Identity: "n1"}, time.Hour), "n2", now, ErrOutOfScope},
		{"unscoped", mk(Scope{}, time.Hour), "anything", now, nil},
		{"expired", mk(Scope{}, time.Minute), "n1", now.Add(time.Hour), ErrExpired},
		{"not yet valid", mk(Scope{}, time.Hour), "n1", now.Add(-time.Hour), ErrInvalid},
		{"unknown issuer", otherTok, "n1", now, ErrUnknownIssuer},
		{"forged claims", forged, "n1", now, ErrInvalid},
		{"alg none", none, "n1", now, ErrInvalid},
		{"hmac confusion", hs, "n1", now, ErrInvalid},
		{"empty", "", "n1", now, ErrMissingToken},
		{"garbage", "a.b.c", "n1", now, ErrInvalid},
		{"oversize", strings.Repeat("a", MaxSize+1), "n1", now, ErrInvalid},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := v.Verify(tc.tok, tc.identity, tc.at)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				if c.Issuer != iss.PublicKey() || c.ID == "" {
					t.Fatalf("claims %+v", c)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Verify = %v, want %v", err, tc.want)
			}
			if tc.tok != "" && len(tc.tok) > 20 && strings.Contains(err.Error(), tc.tok[len(tc.tok)-20:]) {
				t.Fatalf("error leaks the token: %v", err)
			}
		})
	}
}

func TestCreateRejectsBadScope(t *testing.T) {
	iss := newIssuer(t)
	for _, s := range []Scope{
		{Identity: "../etc"},
		{Pattern: "["},
		{Identity: "a", Pattern: "b*"},
		{MaxUses: -1},
		{ProvisionerKeys: []string{"not-a-key"}},
		{CAPin: "md5:abc"},
		{Brokers: []string{"a b"}},
		{Batch: "x\ny"},
	} {
		if _, _, err := iss.Create(s, time.Now(), time.Hour); !errors.Is(err, ErrInvalid) {
			t.Errorf("Create(%+v) = %v, want ErrInvalid", s, err)
		}
	}
	if _, _, err := iss.Create(Scope{}, time.Now(), 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("zero ttl accepted")
	}
}

func TestIssuerSeedKinds(t *testing.T) {
	if _, err := NewIssuer([]byte("garbage")); !errors.Is(err, ErrBadIssuerSeed) {
		t.Fatalf("garbage seed: %v", err)
	}
	if _, err := NewVerifier([]string{"UABC"}); err == nil {
		t.Fatal("bad issuer key accepted")
	}
}

func TestInspect(t *testing.T) {
	iss := newIssuer(t)
	tok, _, err := iss.Create(Scope{Identity: "n1", Brokers: []string{"tls://b:4222"}}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Inspect(tok)
	if err != nil {
		t.Fatal(err)
	}
	if c.Muster.Identity != "n1" || len(c.Muster.Brokers) != 1 {
		t.Fatalf("claims %+v", c.Muster)
	}
}

func FuzzVerify(f *testing.F) {
	iss := newIssuer(f)
	v, err := NewVerifier([]string{iss.PublicKey()})
	if err != nil {
		f.Fatal(err)
	}
	now := time.Now()
	tok, _, _ := iss.Create(Scope{Pattern: "n*"}, now, time.Hour)
	f.Add(tok)
	f.Add("eyJhbGciOiJub25lIn0.e30.")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := v.Verify(s, "n1", now)
		if err == nil && (c == nil || c.Issuer != iss.PublicKey()) {
			t.Fatalf("accepted token with claims %+v", c)
		}
		_, _ = Inspect(s)
	})
}
