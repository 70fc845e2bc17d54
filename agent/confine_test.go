package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// handleDirected sends a signed request to the session's node subject and
// decodes the reply.
func handleDirected(t *testing.T, s *session, ag, action string, body any) *protocol.Reply {
	t.Helper()
	res := s.handle(s.nodeSubject, newRequest("", s.a.id, ag, action, testKey, time.Now(), body), time.Now())
	rep, err := protocol.DecodeReply(res.reply)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// lsnapshot is every entry under dir without following links: mode and
// content of files, target of links.
func lsnapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			out[p] = "link " + target
		case d.Type().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[p] = fmt.Sprintf("%v %s", info.Mode(), b)
		default:
			out[p] = info.Mode().String()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// emptyDir fails the test when dir holds anything.
func emptyDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Fatalf("%d entries written outside the state directory, first %s", len(entries), entries[0].Name())
	}
}

// TestConfigureRefusesSymlinksOut: every path a request influences stays in
// the state directory once symbolic links are followed.
func TestConfigureRefusesSymlinksOut(t *testing.T) {
	c, _ := newCA(t)
	certFor := func(t *testing.T, s *session) protocol.ConfigureRequest {
		t.Helper()
		rep := handleDirected(t, s, protocol.AgentProvision, protocol.ActionGenCSR, protocol.GenCSRRequest{})
		if rep.Code != protocol.CodeOK {
			t.Fatalf("gencsr: %s %s", rep.Code, rep.Message)
		}
		var g protocol.GenCSRReply
		if err := json.Unmarshal(rep.Body, &g); err != nil {
			t.Fatal(err)
		}
		cert, err := c.SignCSR([]byte(g.CSR), nil)
		if err != nil {
			t.Fatal(err)
		}
		return protocol.ConfigureRequest{
			Configuration: map[string]string{"plugin.choria.middleware_hosts": "prod.example.net:4222"},
			Certificate:   string(cert), CA: string(c.CertificatePEM()), SSLDir: g.SSLDir,
		}
	}
	cases := []struct {
		name  string
		link  string // path under the state directory made a link to outside
		body  func(t *testing.T, s *session, outside string) protocol.ConfigureRequest
		code  protocol.Code
		alsoS string
	}{
		{"configured key path through a link", "out", func(t *testing.T, s *session, _ string) protocol.ConfigureRequest {
			return protocol.ConfigureRequest{Configuration: map[string]string{"plugin.security.file.key": filepath.Join(s.a.stateDir, "out", "key.pem")}}
		}, protocol.CodeBadRequest, ""},
		{"ssl directory linked out", SSLDirName, func(t *testing.T, s *session, _ string) protocol.ConfigureRequest {
			return certFor(t, s)
		}, protocol.CodeInternal, ""},
		{"policies directory linked out", PoliciesDir, func(t *testing.T, s *session, _ string) protocol.ConfigureRequest {
			return protocol.ConfigureRequest{Configuration: map[string]string{"loglevel": "info"}, ActionPolicies: map[string]string{"web": "allow"}}
		}, protocol.CodeInternal, ""},
		{"certificate file linked out", filepath.Join(SSLDirName, CertFile), func(t *testing.T, s *session, _ string) protocol.ConfigureRequest {
			return certFor(t, s)
		}, protocol.CodeInternal, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := fuzzSession(t, ModeProvisioning)
			outside := t.TempDir()
			if err := os.MkdirAll(filepath.Dir(filepath.Join(s.a.stateDir, tc.link)), 0o700); err != nil {
				t.Fatal(err)
			}
			target := outside
			if strings.HasSuffix(tc.link, ".pem") {
				target = filepath.Join(outside, "certificate.pem") // not there yet
			}
			if err := os.Symlink(target, filepath.Join(s.a.stateDir, tc.link)); err != nil {
				t.Fatal(err)
			}
			body := tc.body(t, s, outside)
			before := lsnapshot(t, s.a.stateDir)
			rep := handleDirected(t, s, protocol.AgentProvision, protocol.ActionConfigure, body)
			if rep.Code != tc.code {
				t.Fatalf("configure: %s (%s), want %s", rep.Code, rep.Message, tc.code)
			}
			if strings.Contains(rep.Message, outside) || strings.Contains(rep.Message, s.a.stateDir) {
				t.Errorf("the reply names a path: %q", rep.Message)
			}
			emptyDir(t, outside)
			after := lsnapshot(t, s.a.stateDir)
			if len(after) != len(before) {
				t.Fatalf("files changed in the state directory: %d → %d", len(before), len(after))
			}
			for p, v := range before {
				if after[p] != v {
					t.Errorf("%s changed", p)
				}
			}
		})
	}
}

// TestKeyBehindLinkNotReused: gencsr does not take a key from outside the
// state directory through a link in the ssldir.
func TestKeyBehindLinkNotReused(t *testing.T) {
	s := fuzzSession(t, ModeProvisioning)
	outside := t.TempDir()
	key, err := pki.GenerateKey("", 0)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, _ := pki.MarshalPrivateKey(key)
	pubPEM, _ := pki.MarshalPublicKey(key.Public())
	if err := os.WriteFile(filepath.Join(outside, "key.pem"), keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(s.a.sslDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "key.pem"), filepath.Join(s.a.sslDir, KeyFile)); err != nil {
		t.Fatal(err)
	}
	rep := handleDirected(t, s, protocol.AgentProvision, protocol.ActionGenCSR, protocol.GenCSRRequest{})
	var g protocol.GenCSRReply
	if rep.Code != protocol.CodeOK || json.Unmarshal(rep.Body, &g) != nil {
		t.Fatalf("gencsr: %s %s", rep.Code, rep.Message)
	}
	if g.PublicKey == string(pubPEM) {
		t.Fatal("gencsr used the key behind the link")
	}
}

// TestRunRefusesLinkedSSLDir: an ssl directory linked out of the state
// directory stops the agent before it writes anything there.
func TestRunRefusesLinkedSSLDir(t *testing.T) {
	state, outside := t.TempDir(), t.TempDir()
	if err := os.Symlink(outside, filepath.Join(state, SSLDirName)); err != nil {
		t.Fatal(err)
	}
	a, err := New(Options{Identity: "n1", StateDir: state, Provisioning: ProvisioningSettings{
		Brokers: []string{"tls://127.0.0.1:1"}, TrustedKeys: testTrusted, Enabled: true, InsecureSkipVerify: true}})
	if err != nil {
		t.Fatal(err)
	}
	err = a.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("Run: %v", err)
	}
	emptyDir(t, outside)
}

// TestConfined checks the path confinement rule case by case, with the state
// directory itself reached through a symbolic link, both with the root
// resolved once by Run and resolved on the spot.
func TestConfined(t *testing.T) {
	base := t.TempDir()
	outside := t.TempDir()
	real := filepath.Join(base, "real")
	for _, d := range []string{real + "/ssl", real + "/sub/deeper"} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	state := filepath.Join(base, "state")
	links := map[string]string{
		state:                     real,
		real + "/out":             outside,
		real + "/in":              real + "/sub",
		real + "/dangling":        filepath.Join(outside, "nothing"),
		real + "/ssl/up":          "../sub",
		real + "/ssl/escape":      "../../..",
		real + "/sub/deeper/loop": real + "/sub/deeper/loop",
	}
	for l, target := range links {
		if err := os.Symlink(target, l); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(real+"/file", []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		path string
		want bool
	}{
		{state + "/ssl/cert.pem", true},
		{state + "/new/dir/file", true},
		{state + "/sub/deeper", true},
		{state + "/in/deeper/x", true},
		{state + "/ssl/up/x", true},
		{state + "/ssl/../ssl/key.pem", true},
		{state, false},
		{state + "/..", false},
		{state + "/../real/ssl", false},
		{"ssl/cert.pem", false},
		{state + "/out/x", false},
		{state + "/out", false},
		{state + "/dangling", false},
		{state + "/dangling/x", false},
		{state + "/ssl/escape/x", false},
		{state + "/sub/deeper/loop/x", false},
		{state + "/file/x", false},
	}
	a := &Agent{stateDir: state}
	for _, resolved := range []bool{false, true} {
		a.stateRoot = ""
		if resolved {
			a.stateRoot = real
		}
		for _, tc := range cases {
			if got := a.confined(tc.path); got != tc.want {
				t.Errorf("root resolved %v: confined(%s) = %v, want %v", resolved, tc.path, got, tc.want)
			}
		}
	}
}
