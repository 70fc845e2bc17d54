package helper

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nuid"
)

// ErrHelperDied is returned for requests in flight when a persistent helper
// process exits or is restarted.
var ErrHelperDied = errors.New("helper process ended")

// ErrHelperFailed is returned when a persistent helper answers a request
// with an "error" reply.
var ErrHelperFailed = errors.New("helper reported an error")

// restartBackoff is the least time between two starts of a persistent
// helper, so one that dies at start does not spin.
const restartBackoff = 500 * time.Millisecond

// Persistent runs one long-lived helper process for many requests: request
// JSON lines on its stdin, reply JSON lines on its stdout, each reply tagged
// with its request's request_id, so replies may come back in any order and
// many requests may be in flight (docs/helpers.md, "Persistent mode"). The
// process starts on the first request and again after it dies.
type Persistent struct {
	e *Exec

	mu        sync.Mutex
	proc      *persistentProc
	lastStart time.Time
	closed    bool
}

// NewPersistent validates opts like NewExec (MaxStdout bounds one reply
// line) and returns the runner; no process starts yet.
func NewPersistent(opts ExecOptions) (*Persistent, error) {
	e, err := NewExec(opts)
	if err != nil {
		return nil, err
	}
	return &Persistent{e: e}, nil
}

type result struct {
	rep *Reply
	err error
}

// persistentProc is one running helper process.
type persistentProc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr *headWriter
	wmu    sync.Mutex // one line at a time on stdin

	mu      sync.Mutex
	waiting map[string]chan result
	dead    chan struct{} // closed when the process is gone
	deadErr error
}

// Provision sends req (with a fresh request_id when it has none) and waits
// for the reply with that id, the timeout, ctx, or the process's end.
func (p *Persistent) Provision(ctx context.Context, req *Request) (*Reply, error) {
	if req == nil {
		return nil, errors.New("helper: nil request")
	}
	r := *req
	if r.RequestID == "" {
		r.RequestID = nuid.Next()
	}
	fail := func(err error, stderr string) (*Reply, error) {
		return nil, &RunError{Identity: r.Identity, Stderr: stderr, Err: err}
	}
	line, err := EncodeRequest(&r)
	if err != nil {
		return fail(err, "")
	}
	proc, err := p.running(ctx)
	if err != nil {
		return fail(err, "")
	}
	ch := make(chan result, 1)
	proc.mu.Lock()
	if proc.waiting == nil {
		proc.mu.Unlock()
		return fail(ErrHelperDied, proc.stderr.String())
	}
	proc.waiting[r.RequestID] = ch
	proc.mu.Unlock()
	forget := func() {
		proc.mu.Lock()
		if proc.waiting != nil {
			delete(proc.waiting, r.RequestID)
		}
		proc.mu.Unlock()
	}

	proc.wmu.Lock()
	_, err = proc.stdin.Write(append(bytes.TrimRight(line, "\n"), '\n'))
	proc.wmu.Unlock()
	if err != nil {
		forget()
		return fail(fmt.Errorf("%w: write request: %v", ErrHelperDied, err), proc.stderr.String())
	}

	timer := time.NewTimer(p.e.timeout)
	defer timer.Stop()
	select {
	case res := <-ch:
		if res.err != nil {
			return fail(res.err, proc.stderr.String())
		}
		return res.rep, nil
	case <-timer.C:
		forget()
		return fail(fmt.Errorf("%w after %s", ErrTimeout, p.e.timeout), "")
	case <-ctx.Done():
		forget()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fail(fmt.Errorf("%w: %w", ErrTimeout, ctx.Err()), "")
		}
		return fail(ctx.Err(), "")
	}
}

// running returns the live process, starting one when there is none.
func (p *Persistent) running(ctx context.Context) (*persistentProc, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, errors.New("helper closed")
	}
	if p.proc != nil {
		p.proc.mu.Lock()
		dying := p.proc.waiting == nil
		p.proc.mu.Unlock()
		if !dying {
			return p.proc, nil
		}
		<-p.proc.dead // its reader is failing the last requests
		p.proc = nil
	}
	if wait := restartBackoff - time.Since(p.lastStart); wait > 0 && !p.lastStart.IsZero() {
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		}
	}
	proc, err := p.start()
	if err != nil {
		return nil, err
	}
	p.lastStart = time.Now()
	p.proc = proc
	return proc, nil
}

func (p *Persistent) start() (*persistentProc, error) {
	cmd := exec.Command(p.e.path, p.e.argv[1:]...)
	cmd.Args[0] = p.e.argv[0]
	cmd.Env = p.e.env
	cmd.Dir = p.e.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	proc := &persistentProc{
		cmd:     cmd,
		stderr:  &headWriter{limit: p.e.maxStderr},
		waiting: map[string]chan result{},
		dead:    make(chan struct{}),
	}
	cmd.Stderr = proc.stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start helper %s: %w", p.e.argv[0], err)
	}
	proc.stdin = stdin
	go proc.read(stdout, p.e.maxStdout)
	return proc, nil
}

// read dispatches reply lines until stdout ends or a line cannot be
// attributed, then ends the process and fails whatever is still waiting.
func (pp *persistentProc) read(stdout io.Reader, maxLine int) {
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 0, 64*1024), maxLine)
	var cause error
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 {
			continue
		}
		rep, err := DecodeReply(line)
		if err != nil || rep.RequestID == "" {
			// A line we cannot attribute: the stream can no longer be
			// trusted, so the process is replaced.
			if err == nil {
				err = fmt.Errorf("%w: reply without request_id", ErrInvalidReply)
			}
			cause = err
			break
		}
		pp.mu.Lock()
		ch := pp.waiting[rep.RequestID]
		delete(pp.waiting, rep.RequestID)
		pp.mu.Unlock()
		if ch != nil {
			if rep.Error != "" {
				ch <- result{err: fmt.Errorf("%w: %s", ErrHelperFailed, truncate(rep.Error, 512))}
			} else {
				ch <- result{rep: rep}
			}
		}
		// A reply for a request that timed out is dropped.
	}
	if cause == nil {
		if err := sc.Err(); err != nil {
			cause = fmt.Errorf("%w: %w: reply line: %v", ErrInvalidReply, ErrTooLarge, err)
		}
	}
	_ = killGroup(pp.cmd)
	waitErr := pp.cmd.Wait()
	if cause == nil {
		var ee *exec.ExitError
		if errors.As(waitErr, &ee) {
			cause = &ExitError{Code: ee.ExitCode(), Stderr: pp.stderr.String()}
		} else {
			cause = ErrHelperDied
		}
	}
	pp.mu.Lock()
	pp.deadErr = cause
	waiting := pp.waiting
	pp.waiting = nil
	pp.mu.Unlock()
	for _, ch := range waiting {
		ch <- result{err: fmt.Errorf("%w: %w", ErrHelperDied, cause)}
	}
	close(pp.dead)
}

// Close ends the helper process: stdin is closed so a well-behaved helper
// exits, and after a grace period its process group is killed. Close waits
// for the process and is safe to call more than once.
func (p *Persistent) Close() error {
	p.mu.Lock()
	p.closed = true
	proc := p.proc
	p.proc = nil
	p.mu.Unlock()
	if proc == nil {
		return nil
	}
	proc.wmu.Lock()
	_ = proc.stdin.Close()
	proc.wmu.Unlock()
	select {
	case <-proc.dead:
	case <-time.After(2 * time.Second):
		_ = killGroup(proc.cmd)
		<-proc.dead
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
