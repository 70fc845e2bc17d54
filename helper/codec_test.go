package helper_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/protocol"
)

var update = flag.Bool("update", false, "rewrite golden files under testdata/")

// goldenCSR is a fixed PEM placeholder (not a parsable CSR) so the rendered
// request is stable.
const goldenCSR = `-----BEGIN CERTIFICATE REQUEST-----
MIHcMIGDAgEAMBwxGjAYBgNVBAMTEW5vZGUxLmV4YW1wbGUubmV0MFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAE
-----END CERTIFICATE REQUEST-----
`

func TestEncodeRequestGolden(t *testing.T) {
	inv, err := json.Marshal(protocol.Inventory{
		Agents:         []string{"choria_provision", "choria_util", "rpcutil"},
		Facts:          map[string]string{"country": "mt", "role": "web"},
		Classes:        []string{},
		Collectives:    []string{"provisioning"},
		MainCollective: "provisioning",
		Version:        "1.2.3",
		DataPlugins:    []string{},
	})
	if err != nil {
		t.Fatal(err)
	}
	req := &helper.Request{
		Identity: "node1.example.net",
		CSR: &helper.CSRInfo{
			CSR:       goldenCSR,
			PublicKey: "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n",
			SSLDir:    "/etc/muster/ssl",
		},
		Inventory: string(inv),
		RequestID: "01HZY3J5D8Q4",
		Site:      "mt-1",
	}
	got, err := helper.EncodeRequest(req)
	if err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "request.golden.json")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("rendered request differs from %s (go test -update to accept):\ngot  %s\nwant %s", golden, got, want)
	}
	// The contract's shape: null csr fields when absent, inventory a string.
	var generic map[string]any
	if err := json.Unmarshal(got, &generic); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"identity", "csr", "ed25519_pubkey", "inventory", "jwt"} {
		if _, ok := generic[k]; !ok {
			t.Errorf("request lacks %q", k)
		}
	}
	if _, ok := generic["inventory"].(string); !ok {
		t.Errorf("inventory is %T, want a JSON string", generic["inventory"])
	}
	back, err := helper.DecodeRequest(got)
	if err != nil || back.Identity != req.Identity || back.CSR.SSLDir != req.CSR.SSLDir || back.Site != "mt-1" {
		t.Errorf("round trip: %+v, %v", back, err)
	}
}

func TestDecodeReply(t *testing.T) {
	cases := []struct {
		name string
		in   string
		want []error
	}{
		{"defer", `{"defer":true,"msg":"later"}`, nil},
		{"configure with unknown keys", `{"configuration":{"a":"b"},"x-new":1}` + "\n", nil},
		{"null configuration value", `{"configuration":{"a":null}}`, nil},
		{"empty", " \n", []error{helper.ErrEmpty}},
		{"array", `[]`, []error{helper.ErrBadJSON}},
		{"string", `"hi"`, []error{helper.ErrBadJSON}},
		{"truncated", `{"defer":`, []error{helper.ErrBadJSON}},
		{"trailing", `{"defer":true} x`, []error{helper.ErrBadJSON}},
		{"configuration array", `{"configuration":["a"]}`, []error{helper.ErrBadJSON, helper.ErrInvalidReply}},
		{"configuration number", `{"configuration":{"a":1}}`, []error{helper.ErrBadJSON, helper.ErrInvalidReply}},
		{"retry_after string", `{"retry_after":"5"}`, []error{helper.ErrBadJSON, helper.ErrInvalidReply}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := helper.DecodeReply([]byte(c.in))
			if len(c.want) == 0 && err != nil {
				t.Fatalf("error = %v", err)
			}
			for _, w := range c.want {
				if !errors.Is(err, w) {
					t.Errorf("error = %v, want %v", err, w)
				}
			}
		})
	}
}

func TestDecodeRequestLimits(t *testing.T) {
	big := `{"identity":"` + strings.Repeat("a", helper.MaxRequestSize) + `"}`
	if _, err := helper.DecodeRequest([]byte(big)); !errors.Is(err, helper.ErrTooLarge) {
		t.Errorf("oversized request: %v", err)
	}
	if _, err := helper.DecodeRequest([]byte(`{"identity":"n","future":1}`)); err != nil {
		t.Errorf("unknown request key refused: %v", err)
	}
	if _, err := helper.DecodeRequest([]byte(`{"identity":5}`)); err == nil {
		t.Error("mistyped identity accepted")
	}
}

type fixedHelper struct{ rep *helper.Reply }

func (f fixedHelper) Provision(context.Context, *helper.Request) (*helper.Reply, error) {
	r := *f.rep
	return &r, nil
}

func TestServeOne(t *testing.T) {
	var out bytes.Buffer
	in := strings.NewReader(`{"identity":"node1","request_id":"r9"}` + "\n")
	if err := helper.ServeOne(context.Background(), fixedHelper{&helper.Reply{Defer: true}}, in, &out); err != nil {
		t.Fatal(err)
	}
	rep, err := helper.DecodeReply(out.Bytes())
	if err != nil || !rep.Defer || rep.RequestID != "r9" {
		t.Fatalf("reply %q: %+v %v", out.String(), rep, err)
	}
	if !strings.HasSuffix(out.String(), "}\n") {
		t.Errorf("reply %q does not end with a newline", out.String())
	}
	err = helper.ServeOne(context.Background(), fixedHelper{&helper.Reply{}}, strings.NewReader("nope"), &out)
	if err == nil {
		t.Error("garbage request accepted")
	}
}

func FuzzDecodeReply(f *testing.F) {
	for _, s := range []string{
		`{"defer":true,"msg":"later","retry_after":5}`,
		`{"shutdown":true}`,
		`{"configuration":{"identity":"node1","plugin.choria.middleware_hosts":"b:4222"},"certificate":"x","ca":"y","ssldir":"/s"}`,
		`{"configuration":{"a":1}}`,
		`{"action_policies":{"x":"y"},"server_claims":{"a":[1]},"unknown":null}`,
		``, `[]`, `{`, `{"defer":true}{}`,
	} {
		f.Add([]byte(s))
	}
	req := &helper.Request{Identity: "node1", CSR: &helper.CSRInfo{CSR: goldenCSR, SSLDir: "/s"}}
	f.Fuzz(func(t *testing.T, data []byte) {
		rep, err := helper.DecodeReply(data)
		if err != nil {
			if rep != nil {
				t.Fatal("reply and error")
			}
			if !errors.Is(err, helper.ErrEmpty) && !errors.Is(err, helper.ErrBadJSON) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
			return
		}
		// A decoded reply re-encodes and decodes to the same thing.
		b, err := json.Marshal(rep)
		if err != nil {
			t.Fatal(err)
		}
		again, err := helper.DecodeReply(b)
		if err != nil {
			t.Fatalf("re-decode %s: %v", b, err)
		}
		b2, _ := json.Marshal(again)
		if !bytes.Equal(b, b2) {
			t.Fatalf("not stable:\n%s\n%s", b, b2)
		}
		// Validation never panics and only fails with ErrInvalidReply.
		if err := helper.ValidateReply(req, rep, time.Now()); err != nil && !errors.Is(err, helper.ErrInvalidReply) {
			t.Fatalf("validate: %v", err)
		}
	})
}

func FuzzDecodeRequest(f *testing.F) {
	golden, err := os.ReadFile(filepath.Join("testdata", "request.golden.json"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(golden)
	f.Add([]byte(`{"identity":"n","csr":null,"inventory":"","jwt":null}`))
	f.Add([]byte(`{"identity":5}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := helper.DecodeRequest(data)
		if err != nil {
			return
		}
		out, err := helper.EncodeRequest(req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := helper.DecodeRequest(out); err != nil {
			t.Fatalf("re-decode %s: %v", out, err)
		}
	})
}
