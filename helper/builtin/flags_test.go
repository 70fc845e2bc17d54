package builtin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/helper/builtin"
	"github.com/muster-io/muster/internal/x509ca"
)

func parseFlags(t *testing.T, env map[string]string, args ...string) builtin.Flags {
	t.Helper()
	var f builtin.Flags
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	f.Register(fs, func(k string) string { return env[k] })
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestFlagsConfiguration(t *testing.T) {
	_, caDir := newCA(t)
	file := filepath.Join(t.TempDir(), "helper.yaml")
	if err := os.WriteFile(file, []byte("ca: {cert: /etc/ca.pem, key: /etc/ca-key.pem}\nmiddleware_hosts: from-file:4222\nvalidity: 48h\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{builtin.EnvCADir: caDir, builtin.EnvBroker: "from-env:4222"}
	cases := []struct {
		name      string
		env       map[string]string
		args      []string
		wantErr   string
		wantCert  string
		wantHosts string
		validity  string
	}{
		{name: "nothing", wantErr: "--config or --ca-dir"},
		{name: "environment alone", env: env, wantCert: filepath.Join(caDir, x509ca.CertFile), wantHosts: "from-env:4222"},
		{name: "flags over the environment", env: env, args: []string{"--ca-dir", "/other", "--middleware-hosts", "flag:1"},
			wantCert: "/other/ca.pem", wantHosts: "flag:1"},
		{name: "file alone", args: []string{"--config", file}, wantCert: "/etc/ca.pem", wantHosts: "from-file:4222", validity: "48h"},
		{name: "environment over the file", env: env, args: []string{"--config", file},
			wantCert: filepath.Join(caDir, x509ca.CertFile), wantHosts: "from-env:4222", validity: "48h"},
		{name: "missing file", args: []string{"--config", "/nonexistent.yaml"}, wantErr: "no such file"},
		{name: "persistent without concurrency", env: env, args: []string{"--persistent", "--concurrency", "0"}, wantErr: "--concurrency 0"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := parseFlags(t, tc.env, tc.args...)
			cfg, err := f.Configuration()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.CA.Cert != tc.wantCert || cfg.MiddlewareHosts != tc.wantHosts {
				t.Errorf("ca %q hosts %q, want %q %q", cfg.CA.Cert, cfg.MiddlewareHosts, tc.wantCert, tc.wantHosts)
			}
			if tc.validity != "" && cfg.Validity != tc.validity {
				t.Errorf("validity %q, want %q", cfg.Validity, tc.validity)
			}
		})
	}
	if f := parseFlags(t, nil); f.Concurrency != builtin.DefaultConcurrency || f.Persistent || f.CheckConfig {
		t.Errorf("defaults: %+v", f)
	}
}

func TestRun(t *testing.T) {
	_, caDir := newCA(t)
	env := map[string]string{builtin.EnvCADir: caDir, builtin.EnvBroker: "broker.example.net:4222"}
	ctx := context.Background()

	t.Run("check config", func(t *testing.T) {
		var out bytes.Buffer
		if err := builtin.Run(ctx, parseFlags(t, env, "--check-config"), loadX509, strings.NewReader("not read"), &out, io.Discard); err != nil {
			t.Fatal(err)
		}
		if out.Len() != 0 {
			t.Errorf("check-config wrote %q", out.String())
		}
		bad := map[string]string{builtin.EnvCADir: t.TempDir()}
		if err := builtin.Run(ctx, parseFlags(t, bad, "--check-config"), loadX509, nil, io.Discard, io.Discard); err == nil {
			t.Error("check-config accepted a directory without a CA")
		}
	})

	t.Run("one request", func(t *testing.T) {
		req := request(t, map[string]string{"country": "mt"}, newCSR(t, id))
		in, err := helper.EncodeRequest(req)
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		if err := builtin.Run(ctx, parseFlags(t, env), loadX509, bytes.NewReader(in), &out, io.Discard); err != nil {
			t.Fatal(err)
		}
		rep, err := helper.DecodeReply(out.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
			t.Fatal(err)
		}
		if rep.Configuration[builtin.KeyMiddlewareHosts] != "broker.example.net:4222" {
			t.Errorf("middleware hosts %q", rep.Configuration[builtin.KeyMiddlewareHosts])
		}
	})

	t.Run("persistent", func(t *testing.T) {
		var in bytes.Buffer
		reqs := map[string]*helper.Request{}
		for _, rid := range []string{"r1", "r2", "r3"} {
			req := request(t, nil, newCSR(t, id))
			req.RequestID = rid
			reqs[rid] = req
			line, err := helper.EncodeRequest(req)
			if err != nil {
				t.Fatal(err)
			}
			in.Write(line)
		}
		in.WriteString(`{"identity":"", "request_id":"bad"}` + "\n")
		var out bytes.Buffer
		if err := builtin.Run(ctx, parseFlags(t, env, "--persistent", "--concurrency", "2"), loadX509, &in, &out, io.Discard); err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		if len(lines) != 4 {
			t.Fatalf("%d reply lines, want 4:\n%s", len(lines), out.String())
		}
		for _, l := range lines {
			var rep helper.Reply
			if err := json.Unmarshal([]byte(l), &rep); err != nil {
				t.Fatal(err)
			}
			if rep.RequestID == "bad" {
				if rep.Error == "" {
					t.Errorf("request without identity answered %+v", rep)
				}
				continue
			}
			req, ok := reqs[rep.RequestID]
			if !ok {
				t.Fatalf("reply for unknown request %q", rep.RequestID)
			}
			delete(reqs, rep.RequestID)
			if err := helper.ValidateReply(req, &rep, time.Now()); err != nil {
				t.Errorf("%s: %v", rep.RequestID, err)
			}
		}
		if len(reqs) != 0 {
			t.Errorf("unanswered: %v", reqs)
		}
	})
}
