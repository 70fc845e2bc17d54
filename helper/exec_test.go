package helper_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
)

func TestNewExecErrors(t *testing.T) {
	dir := t.TempDir()
	ok := writeScript(t, dir, "ok.sh", "exit 0")
	cases := []struct {
		name string
		opts helper.ExecOptions
		want string
	}{
		{"empty command", helper.ExecOptions{Command: "  "}, "empty"},
		{"unbalanced quotes", helper.ExecOptions{Command: ok + " 'a b"}, "EOF"},
		{"binary not found", helper.ExecOptions{Command: "/nonexistent/muster-helper"}, "no such file"},
		{"not in PATH", helper.ExecOptions{Command: "muster-no-such-helper-xyz"}, "not found"},
		{"negative timeout", helper.ExecOptions{Command: ok, Timeout: -time.Second}, "timeout"},
		{"negative max stdout", helper.ExecOptions{Command: ok, MaxStdout: -1}, "max stdout"},
		{"bad env", helper.ExecOptions{Command: ok, Env: []string{"NOEQUALS"}}, "NOEQUALS"},
		{"missing dir", helper.ExecOptions{Command: ok, Dir: filepath.Join(dir, "nope")}, "not a directory"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := helper.NewExec(c.opts)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("NewExec error = %v, want one containing %q", err, c.want)
			}
		})
	}
}

func TestNewExecReportsEveryProblem(t *testing.T) {
	_, err := helper.NewExec(helper.ExecOptions{Command: "", Timeout: -1, MaxStderr: -1})
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"empty", "timeout", "max stderr"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

// processGone reports whether pid no longer runs (gone or a zombie).
func processGone(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return true
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	// Format: pid (comm) state ...
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && len(s) > i+2 && s[i+2] == 'Z'
}

func TestExecProvision(t *testing.T) {
	req := &helper.Request{
		Identity:  "node1.example.net",
		Inventory: `{"facts":{"country":"mt"}}`,
		RequestID: "r-1",
	}
	cases := []struct {
		name    string
		script  string
		opts    func(*helper.ExecOptions)
		args    string // appended to the command line
		wantErr []error
		check   func(t *testing.T, dir string, rep *helper.Reply, err error)
	}{
		{
			name:   "success reads the request on stdin",
			script: `cat > "$OUT/in.json"; echo '{"configuration":{"identity":"node1.example.net"},"msg":"ok"}'`,
			check: func(t *testing.T, dir string, rep *helper.Reply, _ error) {
				if rep.Configuration["identity"] != "node1.example.net" || rep.Msg != "ok" {
					t.Errorf("reply %+v", rep)
				}
				data, err := os.ReadFile(filepath.Join(dir, "in.json"))
				if err != nil {
					t.Fatal(err)
				}
				var got helper.Request
				if err := json.Unmarshal(data, &got); err != nil {
					t.Fatalf("helper got %q: %v", data, err)
				}
				if got.Identity != req.Identity || got.Inventory != req.Inventory || got.RequestID != "r-1" {
					t.Errorf("helper got %+v", got)
				}
			},
		},
		{
			name:   "helper that does not read stdin",
			script: `echo '{"defer":true,"retry_after":30}'`,
			check: func(t *testing.T, _ string, rep *helper.Reply, _ error) {
				if !rep.Defer || rep.RetryAfter != 30 {
					t.Errorf("reply %+v", rep)
				}
			},
		},
		{
			name:    "non-zero exit keeps stderr",
			script:  `echo "cannot reach the CA" >&2; exit 3`,
			wantErr: []error{helper.ErrExit},
			check: func(t *testing.T, _ string, _ *helper.Reply, err error) {
				var ee *helper.ExitError
				if !errors.As(err, &ee) || ee.Code != 3 {
					t.Errorf("error %v, want ExitError code 3", err)
				}
				if got := helper.Stderr(err); !strings.Contains(got, "cannot reach the CA") {
					t.Errorf("Stderr = %q", got)
				}
				if !strings.Contains(err.Error(), "node1.example.net") {
					t.Errorf("error %q does not name the identity", err)
				}
			},
		},
		{
			name:    "stderr is bounded",
			script:  `i=0; while [ $i -lt 200 ]; do echo "0123456789012345678901234567890123456789" >&2; i=$((i+1)); done; exit 1`,
			opts:    func(o *helper.ExecOptions) { o.MaxStderr = 100 },
			wantErr: []error{helper.ErrExit},
			check: func(t *testing.T, _ string, _ *helper.Reply, err error) {
				got := helper.Stderr(err)
				head, marker, ok := strings.Cut(got, "\n[stderr truncated")
				if !ok || len(head) != 100 || !strings.Contains(marker, "more bytes]") {
					t.Errorf("Stderr = %q (%d bytes)", got, len(got))
				}
			},
		},
		{
			name:    "timeout kills the whole process group",
			script:  `sleep 300 & echo $! > "$OUT/child.pid"; wait`,
			opts:    func(o *helper.ExecOptions) { o.Timeout = 300 * time.Millisecond },
			wantErr: []error{helper.ErrTimeout},
			check: func(t *testing.T, dir string, _ *helper.Reply, _ error) {
				data, err := os.ReadFile(filepath.Join(dir, "child.pid"))
				if err != nil {
					t.Fatal(err)
				}
				pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
				if err != nil {
					t.Fatal(err)
				}
				deadline := time.Now().Add(10 * time.Second)
				for !processGone(pid) {
					if time.Now().After(deadline) {
						t.Fatalf("child %d still running after the timeout", pid)
					}
					time.Sleep(10 * time.Millisecond)
				}
			},
		},
		{
			name:    "empty output",
			script:  `cat >/dev/null; printf '\n  \n'`,
			wantErr: []error{helper.ErrEmpty},
		},
		{
			name:    "garbage",
			script:  `echo 'this is not JSON {'`,
			wantErr: []error{helper.ErrBadJSON},
		},
		{
			name:    "two documents",
			script:  `echo '{"defer":true}{"defer":true}'`,
			wantErr: []error{helper.ErrBadJSON},
		},
		{
			name:    "huge stdout is killed",
			script:  `yes '{"configuration":{"a":"b"}}'`,
			opts:    func(o *helper.ExecOptions) { o.MaxStdout = 4096 },
			wantErr: []error{helper.ErrInvalidReply, helper.ErrTooLarge},
		},
		{
			name:    "configuration with a non-string value",
			script:  `echo '{"configuration":{"loglevel":3}}'`,
			wantErr: []error{helper.ErrBadJSON, helper.ErrInvalidReply},
		},
		{
			name:    "defer that is not a boolean",
			script:  `echo '{"defer":"yes"}'`,
			wantErr: []error{helper.ErrBadJSON},
		},
		{
			name:   "unknown reply keys are ignored",
			script: `echo '{"shutdown":true,"future_key":{"x":[1,2]},"msg":"bye"}'`,
			check: func(t *testing.T, _ string, rep *helper.Reply, _ error) {
				if !rep.Shutdown || rep.Msg != "bye" {
					t.Errorf("reply %+v", rep)
				}
			},
		},
		{
			name:   "shlex quoting and environment",
			script: `printf '{"configuration":{"n":"%s","a1":"%s","a2":"%s","env":"%s"}}' "$#" "$1" "$2" "$EXTRA"`,
			args:   ` 'a b' "c"`,
			opts:   func(o *helper.ExecOptions) { o.Env = append(o.Env, "EXTRA=yes") },
			check: func(t *testing.T, _ string, rep *helper.Reply, _ error) {
				want := map[string]string{"n": "2", "a1": "a b", "a2": "c", "env": "yes"}
				for k, v := range want {
					if rep.Configuration[k] != v {
						t.Errorf("configuration[%s] = %q, want %q (%v)", k, rep.Configuration[k], v, rep.Configuration)
					}
				}
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			script := writeScript(t, dir, "my helper.sh", c.script)
			opts := helper.ExecOptions{
				Command: "'" + script + "'" + c.args,
				Env:     []string{"OUT=" + dir},
				Timeout: 20 * time.Second,
			}
			if c.opts != nil {
				c.opts(&opts)
			}
			e, err := helper.NewExec(opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := e.Argv(); got[0] != script {
				t.Fatalf("Argv = %q", got)
			}
			rep, err := e.Provision(context.Background(), req)
			for _, want := range c.wantErr {
				if !errors.Is(err, want) {
					t.Errorf("error = %v, want %v", err, want)
				}
			}
			if len(c.wantErr) == 0 && err != nil {
				t.Fatalf("error = %v (stderr %q)", err, helper.Stderr(err))
			}
			if len(c.wantErr) > 0 {
				var re *helper.RunError
				if !errors.As(err, &re) || re.Identity != req.Identity {
					t.Errorf("error %v is not a RunError for the identity", err)
				}
			}
			if c.check != nil {
				c.check(t, dir, rep, err)
			}
		})
	}
}

func TestExecContextCancel(t *testing.T) {
	dir := t.TempDir()
	script := writeScript(t, dir, "slow.sh", `echo started > "$OUT/started"; sleep 300`)
	e, err := helper.NewExec(helper.ExecOptions{Command: script, Env: []string{"OUT=" + dir}, Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := e.Provision(ctx, &helper.Request{Identity: "node1"})
		done <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(dir, "started")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("helper never started")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("error = %v, want context.Canceled", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Provision did not return after cancel")
	}
}

func TestExecConcurrent(t *testing.T) {
	dir := t.TempDir()
	script := writeScript(t, dir, "echo.sh", `id=$(sed -n 's/.*"identity":"\([^"]*\)".*/\1/p'); printf '{"configuration":{"identity":"%s"}}' "$id"`)
	e, err := helper.NewExec(helper.ExecOptions{Command: script})
	if err != nil {
		t.Fatal(err)
	}
	const n = 8
	errs := make(chan error, n)
	for i := range n {
		go func() {
			id := "node" + strconv.Itoa(i)
			rep, err := e.Provision(context.Background(), &helper.Request{Identity: id})
			if err == nil && rep.Configuration["identity"] != id {
				err = errors.New("got reply for " + rep.Configuration["identity"] + ", want " + id)
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}
