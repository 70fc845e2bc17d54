package helper_test

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/pki"
)

func TestValidateReply(t *testing.T) {
	const id = "node1.example.net"
	c, _ := newCA(t)
	other, _ := newCA(t)
	key, csr := newCSR(t, id)
	_, otherCSR := newCSR(t, id)

	sign := func(t *testing.T, signer interface {
		SignCSR([]byte, []string) ([]byte, error)
	}, csr string, hosts ...string) string {
		t.Helper()
		cert, err := signer.SignCSR([]byte(csr), hosts)
		if err != nil {
			t.Fatal(err)
		}
		return string(cert)
	}
	good := sign(t, c, csr, id)
	// Same key, another name.
	otherNameCSR, err := pki.CreateCSR(key, "node2.example.net", pki.CSRSubject{})
	if err != nil {
		t.Fatal(err)
	}
	otherName := sign(t, c, string(otherNameCSR), "node2.example.net")
	centralKey, err := pki.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	caPEM := string(c.CertificatePEM())
	const ssldir = "/etc/muster/ssl"
	withCSR := &helper.Request{Identity: id, CSR: &helper.CSRInfo{CSR: csr, SSLDir: ssldir}}
	noCSR := &helper.Request{Identity: id}
	conf := func(kv ...string) map[string]string {
		m := map[string]string{"identity": id, "plugin.choria.middleware_hosts": "b:4222"}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	configured := func(mod func(*helper.Reply)) *helper.Reply {
		r := &helper.Reply{Configuration: conf(), Certificate: good, CA: caPEM, SSLDir: ssldir}
		if mod != nil {
			mod(r)
		}
		return r
	}
	many := map[string]string{}
	for i := range helper.MaxConfigKeys + 1 {
		many["k"+strconv.Itoa(i)] = "v"
	}

	cases := []struct {
		name   string
		req    *helper.Request
		rep    *helper.Reply
		opts   helper.ValidateOptions
		now    time.Time
		want   string // "" means valid
		alsoIs error
	}{
		{name: "configure with certificate", req: withCSR, rep: configured(nil)},
		{name: "configure without ssldir", req: withCSR, rep: configured(func(r *helper.Reply) { r.SSLDir = "" })},
		{name: "configure without CSR", req: noCSR, rep: &helper.Reply{Configuration: conf()}},
		{name: "defer", req: withCSR, rep: &helper.Reply{Defer: true, Msg: "later", RetryAfter: 60}},
		{name: "shutdown", req: withCSR, rep: &helper.Reply{Shutdown: true}},
		{name: "nothing", req: withCSR, rep: &helper.Reply{Msg: "?"}, want: "neither defers"},
		{name: "defer and configure", req: withCSR, rep: configured(func(r *helper.Reply) { r.Defer = true }), want: "exactly one"},
		{name: "defer and shutdown", req: withCSR, rep: &helper.Reply{Defer: true, Shutdown: true}, want: "exactly one"},
		{name: "negative retry_after", req: withCSR, rep: &helper.Reply{Defer: true, RetryAfter: -1}, want: "retry_after"},
		{name: "another request id", req: &helper.Request{Identity: id, RequestID: "a"}, rep: &helper.Reply{Defer: true, RequestID: "b"}, want: "request_id"},
		{name: "cert for another key", req: withCSR, rep: configured(func(r *helper.Reply) { r.Certificate = sign(t, c, otherCSR, id) }), want: "does not match", alsoIs: pki.ErrKeyMismatch},
		{name: "cert for another identity", req: withCSR, rep: configured(func(r *helper.Reply) { r.Certificate = otherName }), want: "does not name", alsoIs: pki.ErrIdentityMismatch},
		{name: "cert from another CA", req: withCSR, rep: configured(func(r *helper.Reply) { r.Certificate = sign(t, other, csr, id) }), want: "chain", alsoIs: pki.ErrUntrusted},
		{name: "expired", req: withCSR, rep: configured(nil), now: time.Now().Add(10 * 365 * 24 * time.Hour), want: "expired", alsoIs: pki.ErrExpired},
		{name: "CSR but no certificate", req: withCSR, rep: &helper.Reply{Configuration: conf()}, want: "no certificate"},
		{name: "certificate but no CA", req: withCSR, rep: configured(func(r *helper.Reply) { r.CA = "" }), want: "no CA"},
		{name: "garbage certificate", req: withCSR, rep: configured(func(r *helper.Reply) { r.Certificate = "nope" }), want: "PEM", alsoIs: pki.ErrBadPEM},
		{name: "ssldir differs", req: withCSR, rep: configured(func(r *helper.Reply) { r.SSLDir = "/tmp" }), want: "ssldir"},
		{name: "config key with space", req: noCSR, rep: &helper.Reply{Configuration: conf("log level", "x")}, want: "whitespace"},
		{name: "config key with equals", req: noCSR, rep: &helper.Reply{Configuration: conf("a=b", "x")}, want: "'='"},
		{name: "empty config key", req: noCSR, rep: &helper.Reply{Configuration: conf("", "x")}, want: "empty"},
		{name: "config key with a slash", req: noCSR, rep: &helper.Reply{Configuration: conf("plugin/x", "y")}, want: "path separator"},
		{name: "config key with dot dot", req: noCSR, rep: &helper.Reply{Configuration: conf("plugin..x", "y")}, want: "'..'"},
		{name: "config key with newline", req: noCSR, rep: &helper.Reply{Configuration: conf("a\nidentity", "y")}, want: "control"},
		{name: "config value with newline", req: noCSR, rep: &helper.Reply{Configuration: conf("loglevel", "info\nidentity = evil")}, want: "newline"},
		{name: "config value too long", req: noCSR, rep: &helper.Reply{Configuration: conf("x", strings.Repeat("a", helper.MaxConfigValueLen+1))}, want: "limit"},
		{name: "too many keys", req: noCSR, rep: &helper.Reply{Configuration: many}, want: "keys, limit"},
		{name: "identity of another node", req: noCSR, rep: &helper.Reply{Configuration: conf("identity", "node2")}, want: "sets identity"},
		{name: "central key refused", req: withCSR, rep: configured(func(r *helper.Reply) { r.Key = string(centralKey) }), want: "central private key"},
		{name: "central key allowed", req: noCSR, opts: helper.ValidateOptions{AllowKey: true},
			rep: configured(func(r *helper.Reply) { r.Key = string(centralKey); r.SSLDir = "" })},
		{name: "certificate without CSR or key", req: noCSR, rep: configured(nil), want: "without a CSR"},
		{name: "policy name with a slash", req: noCSR, rep: &helper.Reply{Configuration: conf(), ActionPolicies: map[string]string{"../x": "allow"}}, want: "plain file name"},
		{name: "policy ok", req: noCSR, rep: &helper.Reply{Configuration: conf(), OPAPolicies: map[string]string{"default.rego": "package x"}}},
		{name: "server_claims not an object", req: noCSR, rep: &helper.Reply{Configuration: conf(), ServerClaims: []byte(`[1]`)}, want: "server_claims"},
		{name: "upgrade with spaces", req: noCSR, rep: &helper.Reply{Configuration: conf(), Upgrade: "1.0 now"}, want: "upgrade"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			now := c.now
			if now.IsZero() {
				now = time.Now()
			}
			err := helper.ValidateReplyWith(c.req, c.rep, now, c.opts)
			if c.want == "" {
				if err != nil {
					t.Fatalf("valid reply refused: %v", err)
				}
				return
			}
			if !errors.Is(err, helper.ErrInvalidReply) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error = %v, want ErrInvalidReply containing %q", err, c.want)
			}
			if c.alsoIs != nil && !errors.Is(err, c.alsoIs) {
				t.Errorf("error = %v, want it to wrap %v", err, c.alsoIs)
			}
		})
	}
}

func TestValidateReplyDefaultRefusesKey(t *testing.T) {
	err := helper.ValidateReply(&helper.Request{Identity: "n"}, &helper.Reply{Configuration: map[string]string{"a": "b"}, Key: "x"}, time.Now())
	if !errors.Is(err, helper.ErrInvalidReply) {
		t.Fatalf("error = %v", err)
	}
}
