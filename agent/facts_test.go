package agent

import (
	"strings"
	"testing"
)

// FuzzParseFacts feeds arbitrary facts files (JSON or YAML): they parse
// into flat string facts with non-empty names, or are refused; never a
// panic.
func FuzzParseFacts(f *testing.F) {
	f.Add([]byte("country: mt\nrack: 12\n"))
	f.Add([]byte(`{"country":"mt","up":true,"n":1.5}`))
	f.Add([]byte("a: &x [1, 2]\nb: *x\n"))
	f.Add([]byte("? [a]\n: b\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		facts, err := parseFacts(data)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "parse facts") {
				t.Fatalf("error %v", err)
			}
			return
		}
		for k := range facts {
			if k == "" {
				t.Fatal("empty fact name accepted")
			}
		}
	})
}
