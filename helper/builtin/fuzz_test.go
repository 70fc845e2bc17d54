package builtin_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/helper/builtin"
)

// FuzzProvisionInventory feeds untrusted inventories (facts drive rules and
// placeholders) to the helper: it must never panic, and whatever it
// configures must pass Muster's reply validation.
func FuzzProvisionInventory(f *testing.F) {
	f.Add(`{"facts":{"country":"mt","dc":"fra1"}}`)
	f.Add(`{"facts":{"dc":"a\nb"}}`)
	f.Add(`{"facts":null,"agents":[1]}`)
	f.Add(`not json`)
	c, _ := newCA(f)
	h, err := builtin.New(c, &builtin.Config{
		MiddlewareHosts: "b:4222",
		Defaults:        map[string]string{"collectives": "mcollective,{{fact:dc}}"},
		Rules: []builtin.Rule{{Name: "mt", Facts: map[string]string{"country": "m?"},
			Set: map[string]string{"plugin.choria.middleware_hosts": "{{fact:country}}.example.net:4223"}}},
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, inv string) {
		req := &helper.Request{Identity: "node1.example.net", Inventory: inv}
		rep, err := h.Provision(context.Background(), req)
		if err != nil {
			if !errors.Is(err, builtin.ErrBadRequest) && !strings.Contains(err.Error(), "newline") {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
			t.Fatalf("helper produced an invalid reply: %v", err)
		}
	})
}

// FuzzParseConfig feeds arbitrary YAML to the built-in helper's
// configuration parser: it is valid (Validate agrees) or refused.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("ca:\n  cert: ca.pem\n  key: ca-key.pem\nmiddleware_hosts: b:4222\n"))
	f.Add([]byte("rules:\n  - name: x\n    facts: {country: 'm?'}\n    set: {loglevel: debug}\n"))
	f.Add([]byte("defaults: {\"a\\nb\": x}\n"))
	f.Add([]byte("unknown: 1\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := builtin.ParseConfig(data)
		if err != nil {
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("accepted a configuration Validate refuses: %v", err)
		}
	})
}
