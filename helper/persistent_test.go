package helper_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/pki"
)

// fakeHelper is the persistent helper the tests run: the test binary
// itself, re-executed with MUSTER_FAKE_HELPER set (see TestMain). Modes:
//
//   - "reverse:N" holds ordinary requests until it has N, then answers
//     them in reverse order of arrival (defer, msg = identity). Requests
//     are special by identity prefix: "slow" is never answered, "crash"
//     exits 7, "garbage" gets a line that is not JSON, "huge" a line of
//     8 KiB, "badtype" a reply with a wrongly typed field, "noid" a reply
//     without request_id, "unknown" a reply for an invented id before its
//     own, "fail" an error reply, "stderr" 1000 stderr lines first.
//   - "stubborn" starts a child (sleep), writes "<pid> <child pid>" to
//     $MUSTER_FAKE_DIR/pids, answers every request at once, and keeps
//     running after stdin ends.
//   - "die" exits 3 at once.
func fakeHelper(mode string) int {
	name, arg, _ := strings.Cut(mode, ":")
	held := 1
	switch name {
	case "die":
		fmt.Fprintln(os.Stderr, "cannot start: no configuration")
		return 3
	case "reverse":
		n, err := strconv.Atoi(arg)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		held = n
	case "stubborn":
		child := exec.Command("sleep", "3600")
		if err := child.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		pids := fmt.Sprintf("%d %d", os.Getpid(), child.Process.Pid)
		if err := os.WriteFile(filepath.Join(os.Getenv("MUSTER_FAKE_DIR"), "pids"), []byte(pids), 0o600); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", mode)
		return 2
	}
	out := bufio.NewWriter(os.Stdout)
	reply := func(v any) {
		b, _ := json.Marshal(v)
		out.Write(append(b, '\n'))
		out.Flush()
	}
	var queue []helper.Request
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(nil, 4<<20)
	for sc.Scan() {
		var req helper.Request
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			fmt.Fprintln(os.Stderr, "bad request line:", err)
			return 2
		}
		id := req.RequestID
		switch p := req.Identity; {
		case strings.HasPrefix(p, "slow"):
			continue
		case strings.HasPrefix(p, "crash"):
			fmt.Fprintln(os.Stderr, "helper crashing on purpose")
			return 7
		case strings.HasPrefix(p, "garbage"):
			out.WriteString("this is not json\n")
			out.Flush()
			continue
		case strings.HasPrefix(p, "huge"):
			out.WriteString(`{"request_id":"` + id + `","msg":"` + strings.Repeat("x", 8<<10) + "\"}\n")
			out.Flush()
			continue
		case strings.HasPrefix(p, "badtype"):
			reply(map[string]any{"request_id": id, "defer": "yes"})
			continue
		case strings.HasPrefix(p, "noid"):
			reply(map[string]any{"defer": true})
			continue
		case strings.HasPrefix(p, "unknown"):
			reply(map[string]any{"request_id": "no-such-request", "defer": true})
			reply(map[string]any{"request_id": id, "defer": true, "msg": p})
			continue
		case strings.HasPrefix(p, "fail"):
			reply(map[string]any{"request_id": id, "error": "no capacity"})
			continue
		case strings.HasPrefix(p, "stderr"):
			for i := range 1000 {
				fmt.Fprintf(os.Stderr, "diagnostic line %d\n", i)
			}
		}
		queue = append(queue, req)
		if len(queue) >= held {
			for i := len(queue) - 1; i >= 0; i-- {
				reply(map[string]any{"request_id": queue[i].RequestID, "defer": true, "msg": queue[i].Identity})
			}
			queue = queue[:0]
		}
	}
	if name == "stubborn" {
		time.Sleep(time.Hour) // ignores the end of stdin; Close must kill it
	}
	return 0
}

// newFake returns a persistent helper running fakeHelper in mode.
func newFake(t *testing.T, mode string, change func(*helper.PersistentOptions)) *helper.Persistent {
	t.Helper()
	opts := helper.PersistentOptions{
		Command: "'" + os.Args[0] + "'",
		Timeout: 20 * time.Second,
		// GORACE: a race-enabled helper would otherwise linger 1s at exit.
		Env: []string{"MUSTER_FAKE_HELPER=" + mode, "MUSTER_FAKE_DIR=" + t.TempDir(), "GORACE=atexit_sleep_ms=0"},
	}
	if change != nil {
		change(&opts)
	}
	p, err := helper.NewPersistent(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// provision sends one request for identity.
func provision(p *helper.Persistent, identity string) (*helper.Reply, error) {
	return p.Provision(context.Background(), &helper.Request{Identity: identity, Inventory: "{}"})
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestNewPersistentErrors(t *testing.T) {
	cases := []struct {
		name string
		opts helper.PersistentOptions
		want []string
	}{
		{"empty command", helper.PersistentOptions{Command: " "}, []string{"empty"}},
		{"not found", helper.PersistentOptions{Command: "/nonexistent/helper"}, []string{"no such file"}},
		{"negative limits", helper.PersistentOptions{Command: os.Args[0], Timeout: -1, MaxLine: -1, MaxInFlight: -2, MaxStderr: -1},
			[]string{"timeout", "max line -1", "max in flight -2", "max stderr"}},
		{"bad env", helper.PersistentOptions{Command: os.Args[0], Env: []string{"NOEQUALS"}}, []string{"NOEQUALS"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := helper.NewPersistent(c.opts)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestPersistentOutOfOrderConcurrent(t *testing.T) {
	const n = 50
	p := newFake(t, "reverse:"+strconv.Itoa(n), nil)
	if got := p.Stats().Starts; got != 0 {
		t.Fatalf("started %d processes before the first request", got)
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("node%02d.example.net", i)
			rep, err := provision(p, id)
			switch {
			case err != nil:
				errs <- fmt.Errorf("%s: %w (stderr %q)", id, err, helper.Stderr(err))
			case !rep.Defer || rep.Msg != id:
				errs <- fmt.Errorf("%s got the reply meant for %q", id, rep.Msg)
			case rep.RequestID == "":
				errs <- fmt.Errorf("%s: reply without request_id", id)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if s := p.Stats(); s.Starts != 1 || s.InFlight != 0 {
		t.Errorf("stats %+v, want one start and nothing in flight", s)
	}
}

func TestPersistentKeepsRequestID(t *testing.T) {
	p := newFake(t, "reverse:1", nil)
	rep, err := p.Provision(context.Background(), &helper.Request{Identity: "n1.example.net", Inventory: "{}", RequestID: "mine-1"})
	if err != nil {
		t.Fatal(err)
	}
	if rep.RequestID != "mine-1" {
		t.Fatalf("reply request_id %q, want mine-1", rep.RequestID)
	}
}

func TestPersistentMaxInFlight(t *testing.T) {
	// Two slots, and the helper answers only pairs: a third concurrent
	// request waits for a slot instead of being sent.
	p := newFake(t, "reverse:2", func(o *helper.PersistentOptions) { o.MaxInFlight = 2 })
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("node%d.example.net", i)
			if rep, err := provision(p, id); err != nil || rep.Msg != id {
				t.Errorf("%s: %+v %v", id, rep, err)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	seen := 0
	for finished := false; !finished; {
		select {
		case <-done:
			finished = true
		case <-time.After(time.Millisecond):
			seen = max(seen, p.Stats().InFlight)
		}
	}
	if seen > 2 {
		t.Errorf("%d requests in flight, limit 2", seen)
	}
}

func TestPersistentTimeoutDoesNotStallOthers(t *testing.T) {
	p := newFake(t, "reverse:1", func(o *helper.PersistentOptions) { o.Timeout = 2 * time.Second })
	slow := make(chan error, 1)
	go func() {
		_, err := provision(p, "slow.example.net")
		slow <- err
	}()
	waitFor(t, "the slow request to be in flight", func() bool { return p.Stats().InFlight == 1 })
	for i := range 10 {
		id := fmt.Sprintf("fast%d.example.net", i)
		if rep, err := provision(p, id); err != nil || rep.Msg != id {
			t.Fatalf("%s while another request hangs: %+v %v", id, rep, err)
		}
	}
	if err := <-slow; !errors.Is(err, helper.ErrTimeout) {
		t.Fatalf("slow request: %v, want helper.ErrTimeout", err)
	}
	if rep, err := provision(p, "after.example.net"); err != nil || rep.Msg != "after.example.net" {
		t.Fatalf("request after the timeout: %+v %v", rep, err)
	}
	if s := p.Stats(); s.Starts != 1 || s.Timeouts != 1 {
		t.Errorf("stats %+v, want one start (the process kept running) and one timeout", s)
	}
}

func TestPersistentCrashFailsInFlightAndRestarts(t *testing.T) {
	p := newFake(t, "reverse:3", nil)
	errs := make(chan error, 3)
	for _, id := range []string{"held1.example.net", "held2.example.net"} {
		go func() {
			_, err := provision(p, id)
			errs <- err
		}()
	}
	waitFor(t, "two requests in flight", func() bool { return p.Stats().InFlight == 2 })
	go func() {
		_, err := provision(p, "crash.example.net")
		errs <- err
	}()
	for range 3 {
		err := <-errs
		if !errors.Is(err, helper.ErrHelperDied) || !errors.Is(err, helper.ErrExit) {
			t.Fatalf("in-flight request: %v, want helper.ErrHelperDied and helper.ErrExit", err)
		}
		var ee *helper.ExitError
		if !errors.As(err, &ee) || ee.Code != 7 {
			t.Errorf("error %v, want exit status 7", err)
		}
		if !strings.Contains(helper.Stderr(err), "crashing on purpose") {
			t.Errorf("stderr %q", helper.Stderr(err))
		}
	}
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("after%d.example.net", i)
			if rep, err := provision(p, id); err != nil || rep.Msg != id {
				t.Errorf("%s after the crash: %+v %v", id, rep, err)
			}
		}()
	}
	wg.Wait()
	if got := p.Stats().Starts; got != 2 {
		t.Errorf("%d starts, want 2", got)
	}
}

func TestPersistentHelperThatCannotStart(t *testing.T) {
	p := newFake(t, "die", nil)
	for i := range 3 {
		_, err := provision(p, "n1.example.net")
		if !errors.Is(err, helper.ErrExit) {
			t.Fatalf("attempt %d: %v, want helper.ErrExit", i, err)
		}
	}
	// Only requests start processes: a dead helper is not respawned in a
	// loop on its own.
	if got := p.Stats().Starts; got > 3 {
		t.Errorf("%d starts for 3 requests", got)
	}
}

func TestPersistentBadLines(t *testing.T) {
	cases := []struct {
		name        string
		identity    string
		wantErr     []error
		wantStarts  int64 // after a following good request
		wantBad     int64
		wantUnknown int64
	}{
		{name: "not JSON restarts", identity: "garbage.example.net",
			wantErr: []error{helper.ErrHelperRestarted, helper.ErrBadJSON}, wantStarts: 2, wantBad: 1},
		{name: "line over MaxLine restarts", identity: "huge.example.net",
			wantErr: []error{helper.ErrHelperRestarted, helper.ErrTooLarge}, wantStarts: 2, wantBad: 1},
		{name: "reply without request_id restarts", identity: "noid.example.net",
			wantErr: []error{helper.ErrHelperRestarted, helper.ErrInvalidReply}, wantStarts: 2, wantBad: 1},
		{name: "wrongly typed reply fails only its request", identity: "badtype.example.net",
			wantErr: []error{helper.ErrBadJSON}, wantStarts: 1, wantBad: 1},
		{name: "reply for an unknown id is dropped", identity: "unknown.example.net",
			wantStarts: 1, wantUnknown: 1},
		{name: "error reply", identity: "fail.example.net",
			wantErr: []error{helper.ErrHelperFailed}, wantStarts: 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := newFake(t, "reverse:1", func(o *helper.PersistentOptions) { o.MaxLine = 4096 })
			rep, err := provision(p, c.identity)
			for _, want := range c.wantErr {
				if !errors.Is(err, want) {
					t.Errorf("error %v, want %v", err, want)
				}
			}
			if len(c.wantErr) == 0 && (err != nil || rep.Msg != c.identity) {
				t.Errorf("reply %+v, error %v", rep, err)
			}
			if rep, err := provision(p, "next.example.net"); err != nil || rep.Msg != "next.example.net" {
				t.Fatalf("next request: %+v %v", rep, err)
			}
			s := p.Stats()
			if s.Starts != c.wantStarts || s.BadLines != c.wantBad || s.UnknownReplies != c.wantUnknown {
				t.Errorf("stats %+v, want starts %d, bad lines %d, unknown %d", s, c.wantStarts, c.wantBad, c.wantUnknown)
			}
		})
	}
}

func TestPersistentContextCancel(t *testing.T) {
	p := newFake(t, "reverse:1", nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := p.Provision(ctx, &helper.Request{Identity: "slow.example.net"})
		done <- err
	}()
	waitFor(t, "the request to be in flight", func() bool { return p.Stats().InFlight == 1 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
	waitFor(t, "the request to be forgotten", func() bool { return p.Stats().InFlight == 0 })
}

func TestPersistentStderrLoggedAndRateLimited(t *testing.T) {
	logger, hook := logtest.NewNullLogger()
	p := newFake(t, "reverse:1", func(o *helper.PersistentOptions) { o.Logger = logrus.NewEntry(logger) })
	if _, err := provision(p, "stderr.example.net"); err != nil {
		t.Fatal(err)
	}
	p.Close()
	lines := 0
	for _, e := range hook.AllEntries() {
		if e.Data["stream"] != "stderr" {
			continue
		}
		lines++
		if e.Data["component"] != "helper" || e.Data["pid"] == nil {
			t.Errorf("stderr entry fields %v", e.Data)
		}
		if !strings.HasPrefix(e.Message, "diagnostic line ") {
			t.Errorf("stderr entry %q", e.Message)
		}
	}
	if lines == 0 || lines >= 1000 {
		t.Errorf("%d of 1000 stderr lines logged, want some but not all", lines)
	}
}

func TestPersistentCloseKillsGroup(t *testing.T) {
	dir := t.TempDir()
	p := newFake(t, "stubborn", func(o *helper.PersistentOptions) {
		o.Env = []string{"MUSTER_FAKE_HELPER=stubborn", "MUSTER_FAKE_DIR=" + dir, "GORACE=atexit_sleep_ms=0"}
	})
	if _, err := provision(p, "n1.example.net"); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "pids"))
	if err != nil {
		t.Fatal(err)
	}
	var pid, child int
	if _, err := fmt.Sscan(string(data), &pid, &child); err != nil {
		t.Fatalf("pids %q: %v", data, err)
	}
	inFlight := make(chan error, 1)
	go func() {
		_, err := provision(p, "slow.example.net")
		inFlight <- err
	}()
	waitFor(t, "a request in flight", func() bool { return p.Stats().InFlight == 1 })
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	// Close waits for the helper itself; the rest of its group got
	// SIGKILL, which the kernel delivers and acts on in its own time.
	if !processGone(pid) {
		t.Errorf("helper %d still running after Close", pid)
	}
	waitFor(t, fmt.Sprintf("the helper's child %d killed with its group", child), func() bool { return processGone(child) })
	if err := <-inFlight; !errors.Is(err, helper.ErrClosed) {
		t.Errorf("in-flight request: %v, want helper.ErrClosed", err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := provision(p, "n2.example.net"); !errors.Is(err, helper.ErrClosed) {
		t.Errorf("Provision after Close: %v, want helper.ErrClosed", err)
	}
}

func TestPersistentBuiltinCfssl(t *testing.T) {
	testPersistentBuiltin(t, musterBin(t)+" helper cfssl")
}

// TestPersistentMusterHelper is the same through the muster-helper binary.
func TestPersistentMusterHelper(t *testing.T) {
	testPersistentBuiltin(t, musterHelperBin(t))
}

// testPersistentBuiltin sends 20 concurrent signing requests to one
// persistent built-in helper process run as command.
func testPersistentBuiltin(t *testing.T, command string) {
	c, caDir := newCA(t)
	p, err := helper.NewPersistent(helper.PersistentOptions{
		Command: command + " --persistent --ca-dir " + caDir + " --middleware-hosts localhost:4222",
		Timeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	caPEM := strings.TrimSpace(string(c.CertificatePEM()))
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("node%02d.example.net", i)
			key, csr := newCSR(t, id)
			pub, err := pki.MarshalPublicKey(key.Public())
			if err != nil {
				t.Error(err)
				return
			}
			req := &helper.Request{Identity: id, CSR: &helper.CSRInfo{CSR: csr, PublicKey: string(pub), SSLDir: "/etc/muster/ssl"}, Inventory: `{"facts":{}}`}
			rep, err := p.Provision(context.Background(), req)
			if err != nil {
				t.Errorf("%s: %v (stderr %q)", id, err, helper.Stderr(err))
				return
			}
			if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
				t.Errorf("%s: %v", id, err)
			}
			if strings.TrimSpace(rep.CA) != caPEM {
				t.Errorf("%s: reply CA is not the test CA", id)
			}
		}()
	}
	wg.Wait()
	if got := p.Stats().Starts; got != 1 {
		t.Errorf("%d processes for 20 requests, want 1", got)
	}
}

// failing is an in-process Helper that fails identities starting with
// "bad" and defers the others.
type failing struct{}

func (failing) Provision(_ context.Context, req *helper.Request) (*helper.Reply, error) {
	if strings.HasPrefix(req.Identity, "bad") {
		return nil, errors.New("cannot sign")
	}
	return &helper.Reply{Defer: true, Msg: req.Identity}, nil
}

func TestServeLines(t *testing.T) {
	in := strings.Join([]string{
		`{"identity":"a.example.net","inventory":"{}","request_id":"1"}`,
		``,
		`not a request`,
		`{"identity":"b.example.net","inventory":"{}"}`,
		`{"identity":7,"request_id":"2"}`,
		`{"identity":"bad.example.net","inventory":"{}","request_id":"3"}`,
		`{"identity":"c.example.net","inventory":"{}","request_id":"4"}`,
	}, "\n") + "\n"
	var out, errOut strings.Builder
	if err := helper.ServeLines(context.Background(), failing{}, strings.NewReader(in), &out, &errOut, 3); err != nil {
		t.Fatal(err)
	}
	got := map[string]helper.Reply{}
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		rep, err := helper.DecodeReply([]byte(line))
		if err != nil {
			t.Fatalf("reply line %q: %v", line, err)
		}
		got[rep.RequestID] = *rep
	}
	want := map[string]func(helper.Reply) bool{
		"1": func(r helper.Reply) bool { return r.Defer && r.Msg == "a.example.net" },
		"2": func(r helper.Reply) bool { return strings.Contains(r.Error, "identity") },
		"3": func(r helper.Reply) bool { return r.Error == "cannot sign" },
		"4": func(r helper.Reply) bool { return r.Defer && r.Msg == "c.example.net" },
	}
	if len(got) != len(want) {
		t.Errorf("replies %v, want ids 1-4", got)
	}
	for id, ok := range want {
		if !ok(got[id]) {
			t.Errorf("reply %s = %+v", id, got[id])
		}
	}
	for _, w := range []string{"skipping request line", "no request_id"} {
		if !strings.Contains(errOut.String(), w) {
			t.Errorf("stderr %q lacks %q", errOut.String(), w)
		}
	}
}

// FuzzServeLines feeds arbitrary request streams to the built-in helper's
// persistent line mode: every reply line it writes is one valid reply
// carrying a request_id, and it never panics.
func FuzzServeLines(f *testing.F) {
	f.Add(`{"identity":"a.example.net","inventory":"{}","request_id":"1"}` + "\n" + `not a request` + "\n")
	f.Add(`{"identity":7,"request_id":"2"}` + "\n\n" + `{"identity":"b.example.net","inventory":"{}"}`)
	f.Add(`{"identity":"bad.example.net","request_id":"3"} trailing`)
	f.Fuzz(func(t *testing.T, in string) {
		var out, errOut strings.Builder
		if err := helper.ServeLines(context.Background(), failing{}, strings.NewReader(in), &out, &errOut, 2); err != nil {
			return // a line over the size limit ends the stream
		}
		for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
			if line == "" {
				continue
			}
			rep, err := helper.DecodeReply([]byte(line))
			if err != nil || rep.RequestID == "" {
				t.Fatalf("reply line %q: %v", line, err)
			}
		}
	})
}
