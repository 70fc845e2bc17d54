package helper

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/logging"
)

// Defaults for PersistentOptions.
const (
	DefaultMaxLine     = 1 << 20
	DefaultMaxInFlight = 64
)

// Persistent-mode errors, beside the sentinels of errors.go.
var (
	// ErrHelperDied is returned for requests in flight when the persistent
	// helper process ends; it is joined with an *ExitError (ErrExit).
	ErrHelperDied = errors.New("helper process ended")
	// ErrHelperRestarted is returned for requests in flight when the
	// persistent helper wrote a line that could not be attributed to a
	// request, so its process was replaced; it wraps the line's error
	// (ErrBadJSON, ErrInvalidReply, ErrTooLarge).
	ErrHelperRestarted = errors.New("helper restarted")
	// ErrHelperFailed is returned when a persistent helper answers a
	// request with an "error" reply.
	ErrHelperFailed = errors.New("helper reported an error")
	// ErrClosed is returned by Provision after Close.
	ErrClosed = errors.New("helper closed")
)

const (
	// closeGrace is how long Close waits for the helper to exit after its
	// stdin is closed before killing its process group.
	closeGrace = 2 * time.Second
	// restartMin and restartMax bound the pause before a process is
	// started after the previous one ended; it doubles for every process
	// that ended without answering anything.
	restartMin = 100 * time.Millisecond
	restartMax = 5 * time.Second
	// stderrLogLine bounds one logged stderr line; stderrBurst and
	// stderrPerSecond rate-limit the logging of stderr lines.
	stderrLogLine   = 1024
	stderrBurst     = 20
	stderrPerSecond = 10
)

// PersistentOptions configures a persistent helper.
type PersistentOptions struct {
	// Command is split into argv like a shell splits words (quotes
	// respected) and run without a shell.
	Command string
	// Timeout bounds one request, from the call to the reply; 0 means
	// DefaultTimeout. A request that times out fails alone: the process
	// keeps running and a late reply is dropped.
	Timeout time.Duration
	// MaxLine bounds one reply line; a longer line restarts the process.
	// 0 means DefaultMaxLine.
	MaxLine int
	// MaxStderr bounds the stderr kept for errors: the last MaxStderr
	// bytes of the process's stderr. 0 means DefaultMaxStderr.
	MaxStderr int
	// Env is extra environment (KEY=value), appended to os.Environ().
	Env []string
	// Dir is the working directory; empty means the current one.
	Dir string
	// MaxInFlight bounds the requests sent to the process and not yet
	// answered; further callers wait. 0 means DefaultMaxInFlight.
	MaxInFlight int
	// Logger receives the helper's stderr lines (bounded and rate-limited)
	// and the lines it could not use. Nil discards them.
	Logger *logrus.Entry
}

// PersistentStats are counters of a persistent helper since it was made.
type PersistentStats struct {
	// Starts counts processes started.
	Starts int64
	// InFlight is the number of requests sent and not yet answered.
	InFlight int
	// Timeouts counts requests that got no reply within the timeout.
	Timeouts int64
	// BadLines counts stdout lines that were not a usable reply (not JSON,
	// wrongly typed, over MaxLine, without request_id).
	BadLines int64
	// UnknownReplies counts replies whose request_id no caller waited for
	// (late replies to timed-out requests, or invented ids); they are
	// dropped.
	UnknownReplies int64
}

// Persistent runs one long-lived helper process for many requests: request
// JSON lines on its stdin, reply JSON lines on its stdout, each reply tagged
// with its request's request_id, so replies may come back in any order and
// many requests may be in flight (docs/helpers.md, "Persistent mode"). The
// process starts on the first request and again, after a short backoff, on
// the first request after it ended. It is safe for concurrent use.
type Persistent struct {
	argv      []string
	path      string
	env       []string
	dir       string
	timeout   time.Duration
	maxLine   int
	maxStderr int
	log       *logrus.Entry
	slots     chan struct{}

	starts, timeouts, badLines, unknown atomic.Int64

	// Request ids made for requests without one: idPrefix (random per
	// runner) and a sequence number.
	idPrefix string
	idSeq    atomic.Uint64

	mu        sync.Mutex
	proc      *persistentProc
	closed    bool
	failures  int       // processes in a row that ended without answering
	nextStart time.Time // no start before this
	wg        sync.WaitGroup
}

// NewPersistent validates opts and returns the runner; no process starts
// yet. It reports every problem: an empty command, unbalanced quotes, a
// program that cannot be found, negative limits, a bad environment entry
// or a missing directory.
func NewPersistent(opts PersistentOptions) (*Persistent, error) {
	var errs []error
	e, err := NewExec(ExecOptions{Command: opts.Command, Timeout: opts.Timeout, MaxStderr: opts.MaxStderr, Env: opts.Env, Dir: opts.Dir})
	if err != nil {
		errs = append(errs, err)
	}
	if opts.MaxLine < 0 {
		errs = append(errs, fmt.Errorf("helper max line %d: must not be negative", opts.MaxLine))
	}
	if opts.MaxInFlight < 0 {
		errs = append(errs, fmt.Errorf("helper max in flight %d: must not be negative", opts.MaxInFlight))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	p := &Persistent{
		argv:      e.argv,
		path:      e.path,
		env:       e.env,
		dir:       e.dir,
		timeout:   e.timeout,
		maxLine:   opts.MaxLine,
		maxStderr: e.maxStderr,
		log:       opts.Logger,
		idPrefix:  rand.Text()[:16],
	}
	if p.maxLine == 0 {
		p.maxLine = DefaultMaxLine
	}
	inFlight := opts.MaxInFlight
	if inFlight == 0 {
		inFlight = DefaultMaxInFlight
	}
	p.slots = make(chan struct{}, inFlight)
	if p.log == nil {
		p.log = logrus.NewEntry(logging.Discard())
	}
	p.log = p.log.WithField("component", "helper")
	return p, nil
}

// Argv returns the helper's argument vector (a copy).
func (p *Persistent) Argv() []string { return append([]string(nil), p.argv...) }

// Timeout returns the effective timeout of one request.
func (p *Persistent) Timeout() time.Duration { return p.timeout }

// Stats returns the helper's counters.
func (p *Persistent) Stats() PersistentStats {
	s := PersistentStats{
		Starts:         p.starts.Load(),
		Timeouts:       p.timeouts.Load(),
		BadLines:       p.badLines.Load(),
		UnknownReplies: p.unknown.Load(),
	}
	p.mu.Lock()
	proc := p.proc
	p.mu.Unlock()
	if proc != nil {
		proc.mu.Lock()
		s.InFlight = len(proc.waiting)
		proc.mu.Unlock()
	}
	return s
}

// result is what the reader hands a waiting caller.
type result struct {
	rep *Reply
	err error
}

// persistentProc is one running helper process.
type persistentProc struct {
	cmd    *exec.Cmd
	stdin  *os.File
	stdout *os.File
	stderr *stderrLog
	wmu    sync.Mutex // one request line at a time on stdin

	mu       sync.Mutex
	waiting  map[string]chan result // nil once the process is gone
	answered bool                   // it delivered at least one reply

	exited  chan struct{} // closed when the process was reaped
	waitErr error         // set before exited is closed
}

// Provision sends req (with a fresh request_id when it has none) to the
// helper process, starting it when none runs, and waits for the reply with
// that id, the timeout, ctx, or the process's end. It does not validate
// the reply against the request; call ValidateReply. Every error is a
// *RunError wrapping ErrTimeout, ErrHelperDied (with an *ExitError and the
// process's recent stderr), ErrHelperRestarted, ErrHelperFailed,
// ErrBadJSON or ErrInvalidReply (a wrongly typed reply to this request),
// ErrClosed, or the context's error when ctx is cancelled.
func (p *Persistent) Provision(ctx context.Context, req *Request) (*Reply, error) {
	if req == nil {
		return nil, errors.New("helper: nil request")
	}
	r := *req
	if r.RequestID == "" {
		r.RequestID = p.idPrefix + strconv.FormatUint(p.idSeq.Add(1), 36)
	}
	fail := func(stderr string, err error) (*Reply, error) {
		return nil, &RunError{Identity: r.Identity, Stderr: stderr, Err: err}
	}
	line, err := EncodeRequest(&r)
	if err != nil {
		return fail("", err)
	}
	deadline := time.Now().Add(p.timeout)
	timer := time.NewTimer(p.timeout)
	defer timer.Stop()
	timedOut := func(what string) (*Reply, error) {
		p.timeouts.Add(1)
		return fail("", fmt.Errorf("%w after %s %s", ErrTimeout, p.timeout, what))
	}
	ended := func() (*Reply, error) {
		if errors.Is(ctx.Err(), context.Canceled) {
			return fail("", ctx.Err())
		}
		return timedOut("")
	}

	select {
	case p.slots <- struct{}{}:
		defer func() { <-p.slots }()
	case <-timer.C:
		return timedOut("waiting for a free slot")
	case <-ctx.Done():
		return ended()
	}

	var proc *persistentProc
	ch := make(chan result, 1)
	for proc == nil {
		proc, err = p.process(ctx, timer.C)
		if err != nil {
			if errors.Is(err, ErrTimeout) {
				return timedOut("waiting for the helper to restart")
			}
			if ctx.Err() != nil {
				return ended()
			}
			return fail("", err)
		}
		proc.mu.Lock()
		switch {
		case proc.waiting == nil: // ended meanwhile: start the next one
			proc.mu.Unlock()
			proc = nil
			continue
		case proc.waiting[r.RequestID] != nil:
			proc.mu.Unlock()
			return fail("", fmt.Errorf("request_id %q is already in flight", r.RequestID))
		default:
			proc.waiting[r.RequestID] = ch
			proc.mu.Unlock()
		}
	}
	forget := func() {
		proc.mu.Lock()
		if proc.waiting != nil {
			delete(proc.waiting, r.RequestID)
		}
		proc.mu.Unlock()
	}

	if err := proc.write(line, deadline); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			forget()
			return timedOut("writing the request")
		}
		// A helper that no longer reads its stdin cannot answer: end it,
		// and report why it ended like any request in flight.
		_ = killGroup(proc.cmd)
	}

	select {
	case res := <-ch:
		if res.err != nil {
			stderr := ""
			if errors.Is(res.err, ErrHelperDied) || errors.Is(res.err, ErrHelperRestarted) {
				stderr = proc.stderr.Tail()
			}
			return fail(stderr, res.err)
		}
		return res.rep, nil
	case <-timer.C:
		forget()
		p.log.WithFields(logrus.Fields{"identity": r.Identity, "request_id": r.RequestID}).Warn("persistent helper did not answer in time")
		return timedOut("")
	case <-ctx.Done():
		forget()
		return ended()
	}
}

// process returns the running process, starting one when there is none
// (after the restart backoff). It gives up with ErrTimeout when expired
// fires, with ctx's error, or with ErrClosed.
func (p *Persistent) process(ctx context.Context, expired <-chan time.Time) (*persistentProc, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrClosed
		}
		if p.proc != nil {
			proc := p.proc
			p.mu.Unlock()
			return proc, nil
		}
		wait := time.Until(p.nextStart)
		if wait <= 0 {
			proc, err := p.start()
			if err != nil {
				p.failures++
				p.nextStart = time.Now().Add(backoff(p.failures))
				p.mu.Unlock()
				return nil, err
			}
			p.proc = proc
			p.mu.Unlock()
			return proc, nil
		}
		p.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-expired:
			t.Stop()
			return nil, ErrTimeout
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		}
	}
}

// backoff is the pause before the next start after failures processes in
// a row ended without answering.
func backoff(failures int) time.Duration {
	d := restartMin
	for i := 0; i < failures && d < restartMax; i++ {
		d *= 2
	}
	return min(d, restartMax)
}

// start starts a helper process and its reader and waiter goroutines.
// p.mu is held.
func (p *Persistent) start() (*persistentProc, error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start helper %s: %w", p.argv[0], err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, fmt.Errorf("start helper %s: %w", p.argv[0], err)
	}
	cmd := exec.Command(p.path, p.argv[1:]...)
	cmd.Args[0] = p.argv[0]
	cmd.Env = p.env
	cmd.Dir = p.dir
	cmd.Stdin = inR
	cmd.Stdout = outW
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = pipeGrace
	proc := &persistentProc{
		cmd:     cmd,
		stdin:   inW,
		stdout:  outR,
		waiting: map[string]chan result{},
		exited:  make(chan struct{}),
	}
	proc.stderr = newStderrLog(p.maxStderr, p.log)
	cmd.Stderr = proc.stderr
	err = cmd.Start()
	// The child has its own copies of these ends.
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, fmt.Errorf("start helper %s: %w", p.argv[0], err)
	}
	p.starts.Add(1)
	proc.stderr.setPID(cmd.Process.Pid)
	p.log.WithField("pid", cmd.Process.Pid).Info("persistent helper started")
	p.wg.Add(2)
	go p.wait(proc)
	go p.read(proc)
	return proc, nil
}

// write sends one request line, giving up at deadline. A line written in
// part corrupts the stream, so the process is killed.
func (pp *persistentProc) write(line []byte, deadline time.Time) error {
	pp.wmu.Lock()
	defer pp.wmu.Unlock()
	if err := pp.stdin.SetWriteDeadline(deadline); err != nil {
		return err
	}
	n, err := pp.stdin.Write(line)
	if err != nil && n > 0 {
		_ = killGroup(pp.cmd) // a line written in part corrupts the stream
	}
	return err
}

// wait reaps the process, kills what it left in its group, and closes its
// stdout after a grace so a leftover that escaped the group cannot keep
// the reader waiting.
func (p *Persistent) wait(pp *persistentProc) {
	defer p.wg.Done()
	err := pp.cmd.Wait()
	_ = killGroup(pp.cmd)
	pp.waitErr = err
	close(pp.exited)
	_ = pp.stdin.Close() // a writer blocked on it fails at once
	_ = pp.stdout.SetReadDeadline(time.Now().Add(pipeGrace))
}

// read dispatches reply lines by request_id until stdout ends or a line
// cannot be attributed, then ends the process and fails every request
// still waiting.
func (p *Persistent) read(pp *persistentProc) {
	defer p.wg.Done()
	log := p.log.WithField("pid", pp.cmd.Process.Pid)
	sc := bufio.NewScanner(pp.stdout)
	// The limit only holds when the initial buffer is not larger.
	sc.Buffer(make([]byte, 0, min(64<<10, p.maxLine+1)), p.maxLine+1)
	var restart error
	for sc.Scan() {
		line := sc.Bytes()
		if len(strings.TrimSpace(string(line))) == 0 {
			continue
		}
		if err := p.dispatch(pp, line, log); err != nil {
			restart = err
			break
		}
	}
	if restart == nil {
		if err := sc.Err(); errors.Is(err, bufio.ErrTooLong) {
			p.badLines.Add(1)
			restart = fmt.Errorf("%w: %w: reply line over %d bytes", ErrInvalidReply, ErrTooLarge, p.maxLine)
		}
	}
	if restart != nil {
		log.WithError(restart).Warn("persistent helper wrote a line that belongs to no request; restarting it")
		_ = killGroup(pp.cmd)
	}
	_ = pp.stdout.Close()
	<-pp.exited
	pp.stderr.Flush()

	p.mu.Lock()
	closed := p.closed
	if p.proc == pp {
		p.proc = nil
	}
	pp.mu.Lock()
	answered := pp.answered
	waiting := pp.waiting
	pp.waiting = nil
	pp.mu.Unlock()
	if answered {
		p.failures = 0
	} else {
		p.failures++
	}
	p.nextStart = time.Now().Add(backoff(p.failures))
	p.mu.Unlock()

	var cause error
	switch {
	case closed:
		cause = ErrClosed
	case restart != nil:
		cause = fmt.Errorf("%w: %w", ErrHelperRestarted, restart)
	default:
		code := 0
		var ee *exec.ExitError
		if errors.As(pp.waitErr, &ee) {
			code = ee.ExitCode()
		}
		cause = fmt.Errorf("%w: %w", ErrHelperDied, &ExitError{Code: code, Stderr: pp.stderr.Tail()})
		if len(waiting) > 0 || code != 0 {
			log.WithError(cause).Warn("persistent helper ended")
		}
	}
	for _, ch := range waiting {
		ch <- result{err: cause}
	}
}

// dispatch hands one reply line to its caller. It returns an error only
// for a line that cannot be attributed to a request, after which the
// stream cannot be trusted.
func (p *Persistent) dispatch(pp *persistentProc, line []byte, log *logrus.Entry) error {
	id, rep, err := attributeReply(line)
	if err != nil {
		p.badLines.Add(1)
	}
	if id == "" {
		return err
	}
	pp.mu.Lock()
	ch := pp.waiting[id]
	delete(pp.waiting, id)
	if ch != nil && err == nil {
		pp.answered = true
	}
	pp.mu.Unlock()
	if ch == nil {
		p.unknown.Add(1)
		log.WithField("request_id", id).Warn("persistent helper replied to no waiting request; reply dropped")
		return nil
	}
	switch {
	case err != nil:
		log.WithField("request_id", id).WithError(err).Warn("persistent helper wrote a bad reply")
		ch <- result{err: err}
	case rep.Error != "":
		ch <- result{err: fmt.Errorf("%w: %s", ErrHelperFailed, truncate(rep.Error, 512))}
	default:
		ch <- result{rep: rep}
	}
	return nil
}

// attributeReply decodes one reply line of a persistent helper: the
// request it answers (id, "" when it cannot be told) and the reply, or the
// error that fails that request (a line without an id is an error too).
func attributeReply(line []byte) (id string, rep *Reply, err error) {
	rep, err = DecodeReply(line)
	if err == nil {
		if rep.RequestID == "" {
			return "", nil, fmt.Errorf("%w: reply without request_id", ErrInvalidReply)
		}
		return rep.RequestID, rep, nil
	}
	// A wrongly typed reply may still say whose it is.
	var probe struct {
		RequestID string `json:"request_id"`
	}
	if json.Unmarshal(line, &probe) == nil {
		id = probe.RequestID
	}
	return id, nil, err
}

// Close ends the helper process: its stdin is closed so a well-behaved
// helper exits, and after a grace period its process group is killed.
// Requests in flight fail with ErrClosed, later ones too. Close waits for
// the process and its goroutines, and is safe to call more than once.
func (p *Persistent) Close() error {
	p.mu.Lock()
	p.closed = true
	proc := p.proc
	p.mu.Unlock()
	if proc != nil {
		_ = proc.stdin.Close() // a writer blocked on it fails at once
		t := time.NewTimer(closeGrace)
		select {
		case <-proc.exited:
		case <-t.C:
		}
		t.Stop()
		_ = killGroup(proc.cmd)
	}
	p.wg.Wait()
	return nil
}

// truncate bounds s to n bytes (on a rune boundary).
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}

// stderrLog receives a persistent helper's stderr: it logs each line
// (bounded, rate-limited) and keeps the last max bytes for errors.
type stderrLog struct {
	mu      sync.Mutex
	log     *logrus.Entry
	max     int
	tail    []byte
	dropped int // bytes dropped from the front of tail
	partial []byte

	tokens     float64
	last       time.Time
	suppressed int
}

func newStderrLog(maxBytes int, log *logrus.Entry) *stderrLog {
	return &stderrLog{log: log, max: maxBytes, tokens: stderrBurst}
}

func (s *stderrLog) setPID(pid int) {
	s.mu.Lock()
	s.log = s.log.WithFields(logrus.Fields{"pid": pid, "stream": "stderr"})
	s.mu.Unlock()
}

// Write implements io.Writer; it never fails.
func (s *stderrLog) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tail = append(s.tail, b...)
	if over := len(s.tail) - s.max; over > 0 {
		s.tail = append(s.tail[:0], s.tail[over:]...)
		s.dropped += over
	}
	rest := b
	for {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			break
		}
		if len(s.partial) < stderrLogLine {
			s.partial = append(s.partial, rest[:min(i, stderrLogLine-len(s.partial))]...)
		}
		s.emit()
		rest = rest[i+1:]
	}
	if room := stderrLogLine - len(s.partial); room > 0 {
		s.partial = append(s.partial, rest[:min(len(rest), room)]...)
	}
	return len(b), nil
}

// Flush logs an unterminated last line.
func (s *stderrLog) Flush() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.partial) > 0 {
		s.emit()
	}
}

// emit logs s.partial when the rate limit allows and resets it. s.mu is
// held.
func (s *stderrLog) emit() {
	line := strings.ToValidUTF8(strings.TrimRight(string(s.partial), "\r"), "\uFFFD")
	s.partial = s.partial[:0]
	now := time.Now()
	if !s.last.IsZero() {
		s.tokens = min(stderrBurst, s.tokens+now.Sub(s.last).Seconds()*stderrPerSecond)
	}
	s.last = now
	if s.tokens < 1 {
		s.suppressed++
		return
	}
	s.tokens--
	entry := s.log
	if s.suppressed > 0 {
		entry = entry.WithField("suppressed", s.suppressed)
		s.suppressed = 0
	}
	entry.Info(line)
}

// Tail returns the last bytes of stderr, with a marker when earlier bytes
// were dropped.
func (s *stderrLog) Tail() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := strings.ToValidUTF8(string(s.tail), "\uFFFD")
	if s.dropped > 0 {
		t = fmt.Sprintf("[stderr truncated: %d earlier bytes]\n", s.dropped) + t
	}
	return t
}
