package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/muster-io/muster/internal/protocol"
)

func TestTokenCommands(t *testing.T) {
	dir := t.TempDir()
	seed := filepath.Join(dir, "issuer.nk")
	out, err := runCLI(t, "token", "init", "--out", seed)
	if err != nil {
		t.Fatalf("token init: %v\n%s", err, out)
	}
	pub := strings.TrimSpace(out)
	if !strings.HasPrefix(pub, "A") {
		t.Fatalf("public key %q", pub)
	}
	if st, err := os.Stat(seed); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("seed file: %v %v", st, err)
	}
	b, _ := os.ReadFile(seed)
	if strings.Contains(out, string(b)) {
		t.Fatal("token init printed the seed")
	}
	if _, err := runCLI(t, "token", "init", "--out", seed); err == nil {
		t.Fatal("token init replaced an existing seed")
	}
	tokFile := filepath.Join(dir, "node.token")
	if out, err := runCLI(t, "token", "create", "--issuer", seed, "--identity-pattern", "web-*.example.net",
		"--batch", "rack12", "--max-uses", "3", "--valid", "1h", "--out", tokFile); err != nil {
		t.Fatalf("token create: %v\n%s", err, out)
	}
	tok, _ := os.ReadFile(tokFile)
	out, err = runCLI(t, "token", "view", "--issuer-key", pub, "--identity", "web-1.example.net", strings.TrimSpace(string(tok)))
	if err != nil {
		t.Fatalf("token view: %v\n%s", err, out)
	}
	for _, want := range []string{"verified", "pattern web-*.example.net", "rack12", "Max uses: 3"} {
		if !strings.Contains(out, want) {
			t.Errorf("view lacks %q:\n%s", want, out)
		}
	}
	if _, err := runCLI(t, "token", "view", "--issuer-key", pub, "--identity", "db-1.example.net", string(tok)); err == nil {
		t.Error("token verified for an identity outside its scope")
	}
	out, err = runCLI(t, "token", "view", string(tok))
	if err != nil || !strings.Contains(out, "NOT VERIFIED") {
		t.Errorf("unverified view: %v\n%s", err, out)
	}
	if _, err := runCLI(t, "token", "create", "--issuer", seed, "--identity", "../etc"); err == nil {
		t.Error("token for an invalid identity created")
	}
}

func TestRequestSign(t *testing.T) {
	dir := t.TempDir()
	seed := filepath.Join(dir, "p.nk")
	out, err := runCLI(t, "provisioner", "nkey", "--out", seed)
	if err != nil {
		t.Fatalf("nkey: %v\n%s", err, out)
	}
	pub := strings.TrimSpace(out)
	out, err = runCLI(t, "request", "sign", "--nkey", seed, "--target", "n1.example.net", "--agent", "choria_provision",
		"--action", "restart", "--body", `{"splay_ms":10}`)
	if err != nil {
		t.Fatalf("request sign: %v\n%s", err, out)
	}
	r, err := protocol.DecodeRequest([]byte(strings.TrimSpace(out)))
	if err != nil {
		t.Fatal(err)
	}
	trusted, _ := protocol.NewKeySet([]string{pub})
	if err := r.VerifySignature(trusted); err != nil {
		t.Fatalf("signature: %v", err)
	}
	var body map[string]int
	if json.Unmarshal(r.Body, &body) != nil || body["splay_ms"] != 10 || r.Target != "n1.example.net" {
		t.Fatalf("request %+v", r)
	}
	if _, err := runCLI(t, "request", "sign", "--nkey", seed, "--body", "{"); err == nil {
		t.Error("bad body accepted")
	}
}
