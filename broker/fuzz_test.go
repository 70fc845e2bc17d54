package broker

import (
	"encoding/base64"
	"errors"
	"testing"

	"github.com/nats-io/nkeys"
)

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("listen: 127.0.0.1:4222\nstore_dir: /tmp/x\n"))
	f.Add([]byte("tls: {cert: a, key: b, ca: c}\nadmins: [x]\n"))
	f.Add([]byte("max_payload: -1\nunknown: 1\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfig(data)
		if err != nil {
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("error does not wrap ErrInvalidConfig: %v", err)
			}
			return
		}
		if cfg.Validate() != nil {
			t.Fatal("accepted config does not validate")
		}
	})
}

func FuzzVerifyNonce(f *testing.F) {
	// A fixed key: fuzz workers run this setup again and must agree.
	kp, err := nkeys.FromRawSeed(nkeys.PrefixByteUser, []byte("muster-broker-fuzz-seed-32-bytes"))
	if err != nil {
		f.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	nonce := []byte("abcdefghijk")
	sig, _ := kp.Sign(nonce)
	good := base64.RawURLEncoding.EncodeToString(sig)
	if !verifyNonce(pub, good, nonce) || !verifyNonce(pub, base64.StdEncoding.EncodeToString(sig), nonce) {
		f.Fatal("valid signature refused")
	}
	f.Add(pub, good, nonce)
	f.Add("UAFAKE", "", []byte{})
	f.Fuzz(func(t *testing.T, key, s string, n []byte) {
		ok := verifyNonce(key, s, n)
		if ok && (key != pub || string(n) != string(nonce)) {
			t.Fatalf("forged signature accepted: key %q nonce %q", key, n)
		}
	})
}
