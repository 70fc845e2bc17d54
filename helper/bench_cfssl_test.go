package helper_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/pki"
)

// cfsslRequests makes n signing requests with real keys and CSRs, outside
// the timed loop.
func cfsslRequests(b *testing.B, n int) []*helper.Request {
	b.Helper()
	reqs := make([]*helper.Request, n)
	for i := range reqs {
		id := fmt.Sprintf("node%04d.example.net", i)
		key, csr := newCSR(b, id)
		pub, err := pki.MarshalPublicKey(key.Public())
		if err != nil {
			b.Fatal(err)
		}
		reqs[i] = &helper.Request{Identity: id, CSR: &helper.CSRInfo{CSR: csr, PublicKey: string(pub), SSLDir: "/etc/muster/ssl"}, Inventory: `{"facts":{}}`}
	}
	return reqs
}

// benchCfssl runs the helper on the requests in turn (or in parallel) and
// validates every reply as the provisioner does.
func benchCfssl(b *testing.B, h helper.Helper, parallel bool) {
	reqs := cfsslRequests(b, 64)
	var next atomic.Int64
	one := func() error {
		req := reqs[int(next.Add(1))%len(reqs)]
		rep, err := h.Provision(context.Background(), req)
		if err != nil {
			return fmt.Errorf("%s: %w (stderr %q)", req.Identity, err, helper.Stderr(err))
		}
		return helper.ValidateReply(req, rep, time.Now())
	}
	b.ReportAllocs()
	b.ResetTimer()
	if parallel {
		b.SetParallelism(4) // 4 × GOMAXPROCS requests in flight
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := one(); err != nil {
					b.Error(err)
					return
				}
			}
		})
		return
	}
	for b.Loop() {
		if err := one(); err != nil {
			b.Fatal(err)
		}
	}
}

// benchExecHelper runs one exec'd helper program per request: process
// start, CA load, signing, reply decode and validation. program is the
// command line before its flags.
func benchExecHelper(b *testing.B, program string) {
	_, caDir := newCA(b)
	e, err := helper.NewExec(helper.ExecOptions{
		Command: program + " --ca-dir " + caDir + " --middleware-hosts localhost:4222",
		Timeout: 30 * time.Second,
	})
	if err != nil {
		b.Fatal(err)
	}
	benchCfssl(b, e, false)
}

// benchPersistentHelper sends the same request through one long-running
// `program --persistent`, one request at a time (latency) and many in
// flight (throughput).
func benchPersistentHelper(b *testing.B, program string) {
	_, caDir := newCA(b)
	for _, parallel := range []bool{false, true} {
		name := "sequential"
		if parallel {
			name = "parallel"
		}
		b.Run(name, func(b *testing.B) {
			p, err := helper.NewPersistent(helper.PersistentOptions{
				Command: program + " --persistent --ca-dir " + caDir + " --middleware-hosts localhost:4222",
				Timeout: 30 * time.Second,
			})
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			benchCfssl(b, p, parallel)
		})
	}
}

// BenchmarkExecCfsslRoundTrip is one exec'd `muster helper cfssl` per
// request.
func BenchmarkExecCfsslRoundTrip(b *testing.B) { benchExecHelper(b, musterBin(b)+" helper cfssl") }

// BenchmarkPersistentCfsslRoundTrip is one long-running `muster helper
// cfssl --persistent`.
func BenchmarkPersistentCfsslRoundTrip(b *testing.B) {
	benchPersistentHelper(b, musterBin(b)+" helper cfssl")
}
