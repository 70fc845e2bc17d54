package helper_test

import (
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
)

// BenchmarkExecMusterHelperRoundTrip is BenchmarkExecCfsslRoundTrip with
// the small muster-helper binary (crypto/x509 signer, no cfssl): process
// start, CA load, signing, reply decode and validation.
func BenchmarkExecMusterHelperRoundTrip(b *testing.B) {
	bin := musterHelperBin(b)
	_, caDir := newCA(b)
	e, err := helper.NewExec(helper.ExecOptions{
		Command: bin + " --ca-dir " + caDir + " --middleware-hosts localhost:4222",
		Timeout: 30 * time.Second,
	})
	if err != nil {
		b.Fatal(err)
	}
	benchCfssl(b, e, false)
}

// BenchmarkPersistentMusterHelperRoundTrip is
// BenchmarkPersistentCfsslRoundTrip with one long-running
// `muster-helper --persistent`.
func BenchmarkPersistentMusterHelperRoundTrip(b *testing.B) {
	bin := musterHelperBin(b)
	_, caDir := newCA(b)
	for _, parallel := range []bool{false, true} {
		name := "sequential"
		if parallel {
			name = "parallel"
		}
		b.Run(name, func(b *testing.B) {
			p, err := helper.NewPersistent(helper.PersistentOptions{
				Command: bin + " --persistent --ca-dir " + caDir + " --middleware-hosts localhost:4222",
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
