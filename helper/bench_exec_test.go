package helper

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkExecRoundTrip measures one exec'd helper invocation: fork/exec
// of a tiny shell helper, request on stdin, reply on stdout, decode.
func BenchmarkExecRoundTrip(b *testing.B) {
	script := filepath.Join(b.TempDir(), "helper.sh")
	body := "#!/bin/sh\ncat >/dev/null\necho '{\"defer\":true,\"msg\":\"later\"}'\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		b.Fatal(err)
	}
	e, err := NewExec(ExecOptions{Command: script, Timeout: 10 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	req := &Request{Identity: "node1.example.net", Inventory: `{"facts":{}}`}
	b.ReportAllocs()
	for b.Loop() {
		rep, err := e.Provision(context.Background(), req)
		if err != nil || !rep.Defer {
			b.Fatalf("%+v %v", rep, err)
		}
	}
}
