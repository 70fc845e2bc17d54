package helper_test

import "testing"

// BenchmarkExecMusterHelperRoundTrip is BenchmarkExecCfsslRoundTrip with
// the small muster-helper binary (crypto/x509 signer, no cfssl).
func BenchmarkExecMusterHelperRoundTrip(b *testing.B) { benchExecHelper(b, musterHelperBin(b)) }

// BenchmarkPersistentMusterHelperRoundTrip is
// BenchmarkPersistentCfsslRoundTrip with one long-running
// `muster-helper --persistent`.
func BenchmarkPersistentMusterHelperRoundTrip(b *testing.B) {
	benchPersistentHelper(b, musterHelperBin(b))
}
