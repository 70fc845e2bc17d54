package broker

import (
	"encoding/base64"
	"errors"
	"net/url"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"
)

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("listen: 127.0.0.1:4222\nstore_dir: /tmp/x\n"))
	f.Add([]byte("tls: {cert: a, key: b, ca: c}\nadmins: [x]\n"))
	f.Add([]byte("max_payload: -1\nunknown: 1\n"))
	f.Add([]byte(""))
	f.Add([]byte("cluster: {name: c, server_name: a, listen: 127.0.0.1:6222, routes: [nats-route://127.0.0.1:6222, nats-route://h:6223]}\njetstream: {replicas: 2}\n"))
	f.Add([]byte("cluster: {listen: ':0', routes: ['nats-route://u:p@h:1'], insecure_plaintext_routes: true, peer_names: [x]}\n"))
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

func FuzzParseRoute(f *testing.F) {
	for _, s := range []string{"nats-route://127.0.0.1:6222", "tls://[::1]:1", "nats://u:secretpw@h:1", "nats-route://h", "h:1", "nats-route://h:99999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := parseRoute(s)
		if err == nil {
			if u.Scheme != "nats-route" || u.User != nil || u.Hostname() == "" || u.Port() == "" || u.Port() == "0" {
				t.Fatalf("parseRoute(%q) accepted %q", s, u)
			}
		}
		if pu, perr := url.Parse(s); perr == nil && pu.User != nil {
			if pw, ok := pu.User.Password(); ok && len(pw) > 3 && strings.Contains(redactURL(s), pw) && !strings.Contains(pu.Redacted(), pw) {
				t.Fatalf("redactURL(%q) shows the password", s)
			}
		}
	})
}
