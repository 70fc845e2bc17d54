package main

import (
	"context"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/muster-io/muster/internal/nodestate"
	"github.com/muster-io/muster/internal/testbroker"
)

func TestNodesFromKV(t *testing.T) {
	b := testbroker.Start(t)
	seed := b.DevPKI().ProvisionerSeed
	nkOpt, err := nats.NkeyOptionFromSeed(seed)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(b.ClientURL(), nats.RootCAs(b.CAFile()), nkOpt)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	st, err := nodestate.New(context.Background(), js, "", 1)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []nodestate.Record{
		{Identity: "a.example.net", State: "provisioned", ProvisionedBy: "prov-1", Serial: "0a", Attempts: 1, Life: "9f2c4e1a0b7d3e5f8a6c1d2e3f4a5b6c"},
		{Identity: "b.example.net", State: "in_progress", Stage: "gencsr", ClaimedBy: "prov-2", Attempts: 2},
	} {
		if err := st.Put(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	url := b.ClientURL()
	ca := b.CAFile()
	out, err := runCLI(t, "nodes", "ls", "--kv", "--broker", url, "--tls-ca", ca, "--nkey", seed)
	if err != nil {
		t.Fatalf("nodes ls --kv: %v\n%s", err, out)
	}
	for _, want := range []string{"a.example.net", "prov-1", "b.example.net", "prov-2", "gencsr"} {
		if !strings.Contains(out, want) {
			t.Errorf("ls lacks %q:\n%s", want, out)
		}
	}
	out, err = runCLI(t, "nodes", "ls", "--kv", "--broker", url, "--tls-ca", ca, "--nkey", seed, "--state", "in_progress")
	if err != nil || strings.Contains(out, "a.example.net") || !strings.Contains(out, "b.example.net") {
		t.Errorf("ls --state: %v\n%s", err, out)
	}
	out, err = runCLI(t, "nodes", "show", "--kv", "--broker", url, "--tls-ca", ca, "--nkey", seed, "a.example.net")
	if err != nil || !strings.Contains(out, `"serial": "0a"`) || !strings.Contains(out, `"life": "9f2c4e1a0b7d3e5f8a6c1d2e3f4a5b6c"`) {
		t.Errorf("show --kv: %v\n%s", err, out)
	}
	if _, err := runCLI(t, "nodes", "ls", "--kv", "--broker", url); err == nil {
		t.Error("--kv without --nkey accepted")
	}
}
