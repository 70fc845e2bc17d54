package helper

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/shlex"
)

// Defaults for ExecOptions.
const (
	DefaultTimeout   = 10 * time.Second
	DefaultMaxStdout = 1 << 20
	DefaultMaxStderr = 64 << 10
)

// pipeGrace is how long Provision waits, after the helper exited, for
// processes it left behind to close its stdout and stderr before they are
// closed for it (and the group killed).
const pipeGrace = 2 * time.Second

// ExecOptions configures an exec'd helper.
type ExecOptions struct {
	// Command is split into argv like a shell splits words (quotes
	// respected) and run without a shell.
	Command string
	// Timeout bounds one run; 0 means DefaultTimeout. On expiry the
	// helper's whole process group is killed.
	Timeout time.Duration
	// MaxStdout bounds the reply; more is ErrInvalidReply (ErrTooLarge)
	// and the process group is killed. 0 means DefaultMaxStdout.
	MaxStdout int
	// MaxStderr bounds the stderr kept: the first MaxStderr bytes, with a
	// truncation marker. 0 means DefaultMaxStderr.
	MaxStderr int
	// Env is extra environment (KEY=value), appended to os.Environ().
	Env []string
	// Dir is the working directory; empty means the current one.
	Dir string
}

// Exec runs a helper program once per request: the request JSON on its
// stdin, the reply JSON read from its stdout. It is safe for concurrent
// use.
type Exec struct {
	argv      []string
	path      string
	timeout   time.Duration
	maxStdout int
	maxStderr int
	env       []string
	dir       string
}

// NewExec validates opts and returns the runner. It reports every problem:
// an empty command, unbalanced quotes, a program that cannot be found,
// negative limits, a bad environment entry or a missing directory.
func NewExec(opts ExecOptions) (*Exec, error) {
	var errs []error
	e := &Exec{
		timeout:   opts.Timeout,
		maxStdout: opts.MaxStdout,
		maxStderr: opts.MaxStderr,
		dir:       opts.Dir,
	}
	if e.timeout == 0 {
		e.timeout = DefaultTimeout
	}
	if e.maxStdout == 0 {
		e.maxStdout = DefaultMaxStdout
	}
	if e.maxStderr == 0 {
		e.maxStderr = DefaultMaxStderr
	}
	if e.timeout < 0 {
		errs = append(errs, fmt.Errorf("helper timeout %s: must be positive", opts.Timeout))
	}
	if e.maxStdout < 0 {
		errs = append(errs, fmt.Errorf("helper max stdout %d: must be positive", opts.MaxStdout))
	}
	if e.maxStderr < 0 {
		errs = append(errs, fmt.Errorf("helper max stderr %d: must be positive", opts.MaxStderr))
	}
	for _, kv := range opts.Env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			errs = append(errs, fmt.Errorf("helper env %q: want KEY=value", kv))
		}
	}
	if opts.Dir != "" {
		if st, err := os.Stat(opts.Dir); err != nil || !st.IsDir() {
			errs = append(errs, fmt.Errorf("helper dir %q: not a directory", opts.Dir))
		}
	}
	switch argv, err := shlex.Split(opts.Command); {
	case err != nil:
		errs = append(errs, fmt.Errorf("helper command %q: %w", opts.Command, err))
	case len(argv) == 0:
		errs = append(errs, fmt.Errorf("helper command %q: empty", opts.Command))
	default:
		e.argv = argv
		path, err := lookPath(argv[0], opts.Dir)
		if err != nil {
			errs = append(errs, fmt.Errorf("helper command %q: %w", opts.Command, err))
		}
		e.path = path
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	e.env = append(os.Environ(), opts.Env...)
	return e, nil
}

// lookPath finds the program, resolving a relative path containing a slash
// against dir (where it will run).
func lookPath(name, dir string) (string, error) {
	if dir != "" && strings.Contains(name, "/") && !strings.HasPrefix(name, "/") {
		name = dir + "/" + name
	}
	return exec.LookPath(name)
}

// Argv returns the helper's argument vector (a copy).
func (e *Exec) Argv() []string { return append([]string(nil), e.argv...) }

// Timeout returns the effective timeout of one run.
func (e *Exec) Timeout() time.Duration { return e.timeout }

// Provision runs the helper for req and decodes its reply. It does not
// validate the reply against the request; call ValidateReply. Every error
// is a *RunError carrying the helper's bounded stderr and wrapping one of
// ErrTimeout, ErrExit (an *ExitError), ErrEmpty, ErrBadJSON,
// ErrInvalidReply/ErrTooLarge, or the context's error when ctx ends first.
func (e *Exec) Provision(ctx context.Context, req *Request) (*Reply, error) {
	if req == nil {
		return nil, errors.New("helper: nil request")
	}
	in, err := EncodeRequest(req)
	if err != nil {
		return nil, &RunError{Identity: req.Identity, Err: err}
	}
	out, stderr, runErr := e.run(ctx, in)
	if runErr != nil {
		return nil, &RunError{Identity: req.Identity, Stderr: stderr, Err: runErr}
	}
	rep, err := DecodeReply(out)
	if err != nil {
		return nil, &RunError{Identity: req.Identity, Stderr: stderr, Err: err}
	}
	return rep, nil
}

// run executes the helper once with in on stdin and returns its stdout and
// bounded stderr.
func (e *Exec) run(ctx context.Context, in []byte) ([]byte, string, error) {
	runCtx, cancel := context.WithTimeout(ctx, e.timeout)
	defer cancel()
	overflow := make(chan struct{})
	var overflowOnce sync.Once
	stdout := &limitWriter{limit: e.maxStdout, onOverflow: func() {
		overflowOnce.Do(func() { close(overflow); cancel() })
	}}
	stderr := &headWriter{limit: e.maxStderr}

	cmd := exec.CommandContext(runCtx, e.path, e.argv[1:]...)
	cmd.Args[0] = e.argv[0]
	cmd.Env = e.env
	cmd.Dir = e.dir
	cmd.Stdin = bytes.NewReader(in)
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return killGroup(cmd) }
	cmd.WaitDelay = pipeGrace

	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("start %s: %w", e.argv[0], err)
	}
	waitErr := cmd.Wait()
	// Nothing the helper started may outlive it.
	_ = killGroup(cmd)

	errText := stderr.String()
	select {
	case <-overflow:
		return nil, errText, fmt.Errorf("%w: %w: stdout over %d bytes", ErrInvalidReply, ErrTooLarge, e.maxStdout)
	default:
	}
	// A deadline, ours or the caller's, is a timeout of the helper; a
	// cancelled caller is not the helper's fault and keeps its own error.
	if errors.Is(ctx.Err(), context.Canceled) {
		return nil, errText, ctx.Err()
	}
	if errors.Is(runCtx.Err(), context.DeadlineExceeded) {
		return nil, errText, fmt.Errorf("%w after %s: %w", ErrTimeout, e.timeout, context.DeadlineExceeded)
	}
	if waitErr != nil {
		var ee *exec.ExitError
		if errors.As(waitErr, &ee) {
			return nil, errText, &ExitError{Code: ee.ExitCode(), Stderr: errText}
		}
		if !errors.Is(waitErr, exec.ErrWaitDelay) {
			return nil, errText, fmt.Errorf("wait for %s: %w", e.argv[0], waitErr)
		}
	}
	return stdout.buf.Bytes(), errText, nil
}

// killGroup sends SIGKILL to the helper's process group. A group that is
// already gone is not an error.
func killGroup(cmd *exec.Cmd) error {
	if cmd.Process == nil {
		return nil
	}
	err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// limitWriter keeps at most limit bytes; the first write past the limit
// calls onOverflow and fails, which stops the copy from the helper.
type limitWriter struct {
	mu         sync.Mutex
	buf        bytes.Buffer
	limit      int
	onOverflow func()
}

// Write implements io.Writer.
func (w *limitWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.buf.Len()+len(p) > w.limit {
		w.onOverflow()
		return 0, ErrTooLarge
	}
	return w.buf.Write(p)
}

// headWriter keeps the first limit bytes written and counts the rest. It
// never fails, so a chatty helper is not disturbed.
type headWriter struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	limit   int
	dropped int
}

// Write implements io.Writer.
func (w *headWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	room := w.limit - w.buf.Len()
	if room >= len(p) {
		w.buf.Write(p)
		return len(p), nil
	}
	if room > 0 {
		w.buf.Write(p[:room])
	}
	w.dropped += len(p) - max(room, 0)
	return len(p), nil
}

// String returns the kept bytes, with a marker when some were dropped.
func (w *headWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := strings.ToValidUTF8(w.buf.String(), "\uFFFD")
	if w.dropped > 0 {
		s += fmt.Sprintf("\n[stderr truncated: %d more bytes]", w.dropped)
	}
	return s
}
