package provisioner

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// Test trust material, made once by TestMain: the provisioner's nkey seed
// file (its signing key), the agents' view of it, and a token issuer.
var (
	testSeedFile string
	testTrusted  *protocol.KeySet
	testIssuer   *token.Issuer
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "muster-provisioner-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := func() int {
		defer os.RemoveAll(dir)
		if err := makeTrust(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return m.Run()
	}()
	os.Exit(code)
}

func makeTrust(dir string) error {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return err
	}
	seed, _ := kp.Seed()
	pub, _ := kp.PublicKey()
	testSeedFile = filepath.Join(dir, "provisioner.nk")
	if err := os.WriteFile(testSeedFile, seed, 0o600); err != nil {
		return err
	}
	if testTrusted, err = protocol.NewKeySet([]string{pub}); err != nil {
		return err
	}
	iseed, _, err := token.GenerateIssuerSeed()
	if err != nil {
		return err
	}
	testIssuer, err = token.NewIssuer(iseed)
	return err
}

// nodeToken is a valid provisioning token for one identity.
func nodeToken(t testing.TB, identity string) string {
	t.Helper()
	tok, _, err := testIssuer.Create(token.Scope{Identity: identity}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
