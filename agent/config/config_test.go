package config

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseWriteRoundTrip(t *testing.T) {
	in := `# a comment
identity = node1.example.net
  plugin.choria.middleware_hosts=broker1:4222, broker2:4222

custom.unknown.key = kept = with equals # not a comment
plugin.choria.server.provision = false
`
	c, err := Parse([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"identity":                       "node1.example.net",
		"plugin.choria.middleware_hosts": "broker1:4222, broker2:4222",
		"custom.unknown.key":             "kept = with equals # not a comment",
		"plugin.choria.server.provision": "false",
	}
	if got := c.Map(); !reflect.DeepEqual(got, want) {
		t.Fatalf("parsed %v, want %v", got, want)
	}
	out := c.Bytes()
	c2, err := Parse(out)
	if err != nil {
		t.Fatalf("parse written config: %v\n%s", err, out)
	}
	if !reflect.DeepEqual(c2.Map(), want) {
		t.Fatalf("round trip %v, want %v", c2.Map(), want)
	}
	if !bytes.Equal(c2.Bytes(), out) {
		t.Fatalf("output not stable:\n%s\n---\n%s", out, c2.Bytes())
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")[1:]
	for i := 1; i < len(lines); i++ {
		if lines[i-1] > lines[i] {
			t.Fatalf("output not sorted: %q before %q", lines[i-1], lines[i])
		}
	}
	if v, set := c.Bool(KeyProvision); v || !set {
		t.Fatalf("Bool(provision) = %v, %v", v, set)
	}
}

func TestParseErrorsNameTheLine(t *testing.T) {
	cases := []struct {
		name, in, want string
	}{
		{"no equals", "a = 1\nnot a pair\n", "line 2"},
		{"space in key", "# c\n\nbad key = 1\n", "line 3"},
		{"empty key", " = 1\n", "line 1"},
		{"duplicate", "a = 1\nb = 2\na = 3\n", "line 3"},
		{"control in value", "a = x\x01y\n", "line 1"},
		{"invalid utf8 key", "\xff = 1\n", "line 1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.in))
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not name %q", err, tc.want)
			}
		})
	}
}

func TestSetValidates(t *testing.T) {
	cases := []struct {
		name, key, value string
		want             error
	}{
		{"newline in value", "a", "x\ny", ErrInvalidVal},
		{"newline in key", "a\nb", "x", ErrInvalidKey},
		{"equals in key", "a=b", "x", ErrInvalidKey},
		{"comment key", "#a", "x", ErrInvalidKey},
		{"empty key", "", "x", ErrInvalidKey},
		{"tab in key", "a\tb", "x", ErrInvalidKey},
		{"slash in key", "plugin/../x", "x", ErrInvalidKey},
		{"backslash in key", "a\\b", "x", ErrInvalidKey},
		{"dot dot in key", "plugin..x", "x", ErrInvalidKey},
		{"carriage return in value", "a", "x\ry", ErrInvalidVal},
		{"ok", "a.b_c-d", "x y\tz", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := New().Set(tc.key, tc.value)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Set(%q, %q) = %v, want %v", tc.key, tc.value, err, tc.want)
			}
		})
	}
}

func TestMasked(t *testing.T) {
	c, err := FromMap(map[string]string{
		"plugin.choria.token":      "t0ps3cret",
		"db.Password":              "hunter2",
		"api.secret_key":           "s",
		"tls.key_pem":              "-----BEGIN",
		"nats.nkey_seed":           "SU...",
		"loglevel":                 "info",
		"plugin.security.file.key": "/x/private.pem",
	})
	if err != nil {
		t.Fatal(err)
	}
	m := c.Masked()
	for _, k := range []string{"plugin.choria.token", "db.Password", "api.secret_key", "tls.key_pem", "nats.nkey_seed"} {
		if m[k] != Mask {
			t.Errorf("%s = %q, want masked", k, m[k])
		}
	}
	if m["loglevel"] != "info" || m["plugin.security.file.key"] != "/x/private.pem" {
		t.Errorf("non-secret keys masked: %v", m)
	}
	if c.Value("plugin.choria.token") != "t0ps3cret" {
		t.Error("Masked changed the configuration")
	}
}

func TestSaveLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.cfg")
	c := New()
	if err := c.Set("identity", "n1"); err != nil {
		t.Fatal(err)
	}
	if err := c.Save(path); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", st.Mode().Perm())
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.Value("identity") != "n1" {
		t.Fatalf("loaded %v", got.Map())
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("a = b\n# c\n\nd=e=f\n"))
	f.Add([]byte("key with space = 1"))
	f.Add([]byte("a = 1\na = 2"))
	f.Add([]byte("\xff\xfe = \x00"))
	f.Add([]byte("a = \u2028b\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			return
		}
		out := c.Bytes()
		c2, err := Parse(out)
		if err != nil {
			t.Fatalf("written config does not parse: %v\n%q", err, out)
		}
		if !reflect.DeepEqual(c.Map(), c2.Map()) {
			t.Fatalf("round trip changed the config: %v vs %v", c.Map(), c2.Map())
		}
		if !bytes.Equal(out, c2.Bytes()) {
			t.Fatal("output not stable")
		}
	})
}

func TestExampleConfigParses(t *testing.T) {
	c, err := Load(filepath.Join("..", "..", "examples", "agent", "agent.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	if v, set := c.Bool(KeyProvision); v || !set {
		t.Fatal("example should set provision = false")
	}
}
