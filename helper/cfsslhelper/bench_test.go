package cfsslhelper_test

import (
	"context"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/helper/cfsslhelper"
	"github.com/muster-io/muster/internal/pki"
)

// BenchmarkProvision is the built-in (in-process) helper round trip the
// provisioner makes per node with --helper builtin: configuration, CSR
// form check, cfssl signing (which checks the CSR signature), and the
// reply validation every helper's reply gets.
func BenchmarkProvision(b *testing.B) {
	c, _ := newCA(b)
	h, err := cfsslhelper.NewWithCA(c, &cfsslhelper.Config{MiddlewareHosts: "localhost:4222"})
	if err != nil {
		b.Fatal(err)
	}
	key, err := pki.GenerateKey("", 0)
	if err != nil {
		b.Fatal(err)
	}
	csr, err := pki.CreateCSR(key, id, pki.CSRSubject{})
	if err != nil {
		b.Fatal(err)
	}
	req := &helper.Request{Identity: id, Inventory: `{"facts":{}}`, CSR: &helper.CSRInfo{CSR: string(csr), SSLDir: "/var/lib/muster/ssl"}}
	b.ReportAllocs()
	for b.Loop() {
		rep, err := h.Provision(context.Background(), req)
		if err != nil {
			b.Fatal(err)
		}
		if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
			b.Fatal(err)
		}
	}
}
