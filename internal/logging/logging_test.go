package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/token"
)

// secrets returns a real provisioning token, a user and an account seed and
// a PEM private key.
func secrets(t *testing.T) map[string]string {
	t.Helper()
	iseed, _, err := token.GenerateIssuerSeed()
	if err != nil {
		t.Fatal(err)
	}
	iss, err := token.NewIssuer(iseed)
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := iss.Create(token.Scope{Identity: "node1.example.net"}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	kp, _ := nkeys.CreateUser()
	useed, _ := kp.Seed()
	key, err := pki.GenerateKey("", 0)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := pki.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return map[string]string{"token": tok, "user seed": string(useed), "account seed": string(iseed), "private key": string(keyPEM)}
}

func TestRedact(t *testing.T) {
	for name, secret := range secrets(t) {
		t.Run(name, func(t *testing.T) {
			// Verbatim, and JSON-escaped inside a payload as nats-server
			// traces it.
			esc, _ := json.Marshal(map[string]string{"v": secret})
			for _, in := range []string{"before " + secret + " after", `MSG_PAYLOAD: ["` + string(esc) + `"]`} {
				out := Redact(in)
				if !strings.Contains(out, Redacted) {
					t.Errorf("nothing redacted in %.60q", in)
				}
				for _, part := range strings.Split(strings.TrimSpace(secret), "\n") {
					if len(part) > 20 && strings.Contains(out, part) {
						t.Errorf("%.30q… survives in %q", part, out)
					}
				}
			}
		})
	}
	for _, keep := range []string{
		"connection refused: provisioning token: provisioning token expired",
		"public key UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NVRNBC",
		"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
		"sha256:0123456789abcdef",
	} {
		if got := Redact(keep); got != keep {
			t.Errorf("Redact(%q) = %q", keep, got)
		}
	}
}

func TestNewRedacts(t *testing.T) {
	l, closer, err := New("debug", "")
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	var buf bytes.Buffer
	l.SetOutput(&buf)
	s := secrets(t)
	l.WithField("err", "bad "+s["token"]).Debug("seed " + s["user seed"])
	out := buf.String()
	if strings.Contains(out, s["token"]) || strings.Contains(out, s["user seed"]) || strings.Count(out, Redacted) != 2 {
		t.Fatalf("log line %q", out)
	}
}
