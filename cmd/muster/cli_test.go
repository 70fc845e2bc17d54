package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/nats-io/nkeys"

	"github.com/muster-io/muster/internal/pki"
)

func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	root := newRootCmd()
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	err := root.Execute()
	return out.String() + errOut.String(), err
}

func TestCACommands(t *testing.T) {
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	out, err := runCLI(t, "ca", "init", "--dir", caDir)
	if err != nil {
		t.Fatalf("ca init: %v\n%s", err, out)
	}
	if !strings.Contains(out, "sha256:") {
		t.Fatalf("ca init did not print the pin: %q", out)
	}
	if _, err := runCLI(t, "ca", "init", "--dir", caDir); err == nil {
		t.Fatal("second ca init overwrote the CA")
	}
	pkiDir := filepath.Join(dir, "pki")
	if out, err := runCLI(t, "ca", "issue", "--dir", caDir, "--cn", "broker.example.net", "--host", "127.0.0.1", "--out", pkiDir, "--name", "broker"); err != nil {
		t.Fatalf("ca issue: %v\n%s", err, out)
	}
	st, err := os.Stat(filepath.Join(pkiDir, "broker-key.pem"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("issued key: %v %v", err, st)
	}
	certPEM, _ := os.ReadFile(filepath.Join(pkiDir, "broker.pem"))
	keyPEM, _ := os.ReadFile(filepath.Join(pkiDir, "broker-key.pem"))
	caPEM, _ := os.ReadFile(filepath.Join(caDir, "ca.pem"))
	key, err := pki.ParsePrivateKey(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := pki.VerifyLeaf(certPEM, caPEM, key.Public(), "broker.example.net", leafTime(t, certPEM))
	if err != nil {
		t.Fatalf("issued certificate: %v", err)
	}
	if len(leaf.IPAddresses) != 1 || leaf.IPAddresses[0].String() != "127.0.0.1" {
		t.Fatalf("ip SANs %v", leaf.IPAddresses)
	}
	pinOut, err := runCLI(t, "ca", "pin", "--cert", filepath.Join(caDir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	cas, _ := pki.ParseCertificates(caPEM)
	if strings.TrimSpace(pinOut) != pki.Pin(cas[0]) {
		t.Fatalf("ca pin printed %q, want %q", pinOut, pki.Pin(cas[0]))
	}
}

func leafTime(t *testing.T, certPEM []byte) time.Time {
	t.Helper()
	certs, err := pki.ParseCertificates(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	return certs[0].NotBefore.Add(1)
}

func TestProvisionerNkey(t *testing.T) {
	seedFile := filepath.Join(t.TempDir(), "prov.nk")
	out, err := runCLI(t, "provisioner", "nkey", "--out", seedFile)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	st, err := os.Stat(seedFile)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("seed file: %v %v", err, st)
	}
	seed, _ := os.ReadFile(seedFile)
	if strings.Contains(out, string(seed)) {
		t.Fatal("the seed was printed")
	}
	kp, err := nkeys.FromSeed(seed)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	if strings.TrimSpace(out) != pub {
		t.Fatalf("printed %q, want public key %q", out, pub)
	}
	if _, err := runCLI(t, "provisioner", "nkey", "--out", seedFile); err == nil {
		t.Fatal("existing seed file replaced without --force")
	}
}

func TestEveryCommandHasHelp(t *testing.T) {
	root := newRootCmd()
	for _, c := range allCommands(root) {
		if c.Short == "" {
			t.Errorf("command %q has no short help", c.CommandPath())
		}
	}
}

func allCommands(c *cobra.Command) []*cobra.Command {
	out := []*cobra.Command{c}
	for _, sub := range c.Commands() {
		out = append(out, allCommands(sub)...)
	}
	return out
}
