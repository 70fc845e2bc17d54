package helper

import (
	"runtime"
	"sync"
	"testing"
)

// TestReserveForkP checks that an exec'ing process gets one P more, once,
// and that a GOMAXPROCS the operator set is left alone.
func TestReserveForkP(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	forkP = sync.Once{}
	defer func() { forkP = sync.Once{} }()
	set := func(k string) string {
		if k == "GOMAXPROCS" {
			return "1"
		}
		return ""
	}
	unset := func(string) string { return "" }

	before := runtime.GOMAXPROCS(0)
	if from, to := ReserveForkP(set); from != before || to != before || runtime.GOMAXPROCS(0) != before {
		t.Errorf("GOMAXPROCS set: %d → %d, now %d; want %d left alone", from, to, runtime.GOMAXPROCS(0), before)
	}
	if from, to := ReserveForkP(unset); from != before || to != before+1 || runtime.GOMAXPROCS(0) != before+1 {
		t.Errorf("unset: %d → %d, GOMAXPROCS now %d; want %d → %d", from, to, runtime.GOMAXPROCS(0), before, before+1)
	}
	if from, to := ReserveForkP(unset); from != before+1 || to != before+1 || runtime.GOMAXPROCS(0) != before+1 {
		t.Errorf("second call: %d → %d, GOMAXPROCS now %d; want %d left alone", from, to, runtime.GOMAXPROCS(0), before+1)
	}
}
