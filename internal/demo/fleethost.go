package demo

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/internal/procfs"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// Fleet-host mode: with Options.FleetHost every agent runs in one other
// process, the fleet host (`muster bench fleet-host`): the real agent code,
// each agent with its own state directory and its own TCP + TLS connection
// to this fleet's broker, as in-process agents over TCP have, but outside
// this process. This process then holds only what a provisioning host
// holds (broker, provisioner, helpers), so its CPU is the provisioning
// side's and the host's is the fleet's.
//
// The two talk over the host's standard input and output, one JSON value
// per line (docs/performance.md, "How muster bench measures"):
//
//	fleet → host  {"brokers": [...], "ca": "...", "agents": [...], ...}  the spec
//	host → fleet  {"event":"ready"}                                     agents built
//	fleet → host  {"start":true}                                        run them
//	host → fleet  {"event":"start","identity":"...","at":UnixNano}      one agent ran
//	host → fleet  {"event":"mode","identity":"...","mode":"production","at":...}
//	host → fleet  {"event":"exit","identity":"...","error":"..."}       an agent failed
//
// The fleet closing the host's input stops it: the host stops every agent
// and exits. The provisioning tokens travel in the spec on the pipe, never
// on a command line or in the environment.

// hostSpec is what the fleet host reads first.
type hostSpec struct {
	Brokers          []string      `json:"brokers"`
	ProvisionerKey   string        `json:"provisioner_key"`
	CA               string        `json:"ca"`
	MetadataInterval time.Duration `json:"metadata_interval"`
	LogLevel         string        `json:"log_level"`
	Agents           []simAgent    `json:"agents"`
}

// simAgent is one simulated agent: in a fleet host's spec, and as a fleet
// builds its in-process agents. Delay is how long after the start it runs
// (Options.AgentDelay; fleet host only).
type simAgent struct {
	Identity string            `json:"identity"`
	StateDir string            `json:"state_dir"`
	Token    string            `json:"token"`
	Facts    map[string]string `json:"facts"`
	Delay    time.Duration     `json:"delay"`
}

// hostControl is what the fleet sends after the spec.
type hostControl struct {
	Start bool `json:"start"`
}

// Fleet-host event kinds.
const (
	hostReady = "ready"
	hostStart = "start"
	hostMode  = "mode"
	hostExit  = "exit"
)

// hostEvent is one line the fleet host writes.
type hostEvent struct {
	Event    string `json:"event"`
	Identity string `json:"identity,omitempty"`
	Mode     string `json:"mode,omitempty"`
	At       int64  `json:"at,omitempty"`
	Error    string `json:"error,omitempty"`
}

// Fleet-host limits: an event line (an identity, a mode, a time and an
// agent's error message) and the error text kept from one.
const (
	maxHostEventLen = 16 << 10
	maxHostErrorLen = 1 << 10
)

// errHostEvent wraps every malformed fleet-host event.
var errHostEvent = errors.New("bad fleet-host event")

// decodeHostEvent decodes and checks one event line of the fleet host.
func decodeHostEvent(line []byte) (hostEvent, error) {
	var ev hostEvent
	if len(line) > maxHostEventLen {
		return ev, fmt.Errorf("%w: %d bytes, at most %d", errHostEvent, len(line), maxHostEventLen)
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ev); err != nil {
		return ev, fmt.Errorf("%w: %v", errHostEvent, err)
	}
	if dec.More() {
		return ev, fmt.Errorf("%w: data after the event", errHostEvent)
	}
	if ev.Event == hostReady {
		if ev.Identity != "" || ev.Mode != "" || ev.At != 0 || ev.Error != "" {
			return ev, fmt.Errorf("%w: ready carries nothing", errHostEvent)
		}
		return ev, nil
	}
	if err := protocol.ValidateIdentity(ev.Identity); err != nil {
		return ev, fmt.Errorf("%w: %s: %v", errHostEvent, ev.Event, err)
	}
	switch ev.Event {
	case hostStart:
		if ev.At <= 0 || ev.Mode != "" || ev.Error != "" {
			return ev, fmt.Errorf("%w: start needs a time and nothing else", errHostEvent)
		}
	case hostMode:
		if ev.At <= 0 || ev.Error != "" {
			return ev, fmt.Errorf("%w: mode needs a time", errHostEvent)
		}
		if _, err := parseMode(ev.Mode); err != nil {
			return ev, fmt.Errorf("%w: %v", errHostEvent, err)
		}
	case hostExit:
		if ev.Error == "" || len(ev.Error) > maxHostErrorLen || ev.Mode != "" {
			return ev, fmt.Errorf("%w: exit needs an error of at most %d bytes", errHostEvent, maxHostErrorLen)
		}
	default:
		return ev, fmt.Errorf("%w: unknown event %q", errHostEvent, ev.Event)
	}
	return ev, nil
}

// parseMode is agent.Mode's String the other way.
func parseMode(s string) (agent.Mode, error) {
	for _, m := range []agent.Mode{agent.ModeProvisioning, agent.ModeProduction} {
		if m.String() == s {
			return m, nil
		}
	}
	return 0, fmt.Errorf("unknown mode %q", s)
}

// fleetHost is the running fleet host, as the fleet sees it.
type fleetHost struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	enc     *json.Encoder
	logFile string
	ready   chan struct{} // closed on the host's ready event
	done    chan struct{} // closed once the host was waited for
	err     error         // its exit error, valid after done
	cpu0    time.Duration // its CPU when the agents started
}

// hostReadyTimeout bounds how long the host may take to build its agents.
const hostReadyTimeout = 5 * time.Minute

// prepareHost starts the fleet host, sends it the spec of every agent
// (state directory, facts, token, delay) and waits until it has built
// them, so that Start only tells it to run them.
func (f *Fleet) prepareHost(brokerURL string, issuer *token.Issuer, provKey string) error {
	spec := hostSpec{
		Brokers:          []string{brokerURL},
		ProvisionerKey:   provKey,
		CA:               string(f.ca.CertificatePEM()),
		MetadataInterval: f.opts.MetadataInterval,
		LogLevel:         f.log.GetLevel().String(),
		Agents:           make([]simAgent, 0, len(f.ids)),
	}
	now := time.Now()
	known := make(map[string]bool, len(f.ids))
	for i, id := range f.ids {
		tok, err := nodeToken(issuer, id, now)
		if err != nil {
			return err
		}
		var delay time.Duration
		if f.opts.AgentDelay != nil {
			delay = f.opts.AgentDelay(i)
		}
		spec.Agents = append(spec.Agents, simAgent{
			Identity: id, StateDir: f.AgentDir(id), Token: tok, Facts: f.opts.Facts(i), Delay: delay,
		})
		known[id] = true
	}
	h := &fleetHost{
		logFile: filepath.Join(f.dir, "fleet-host.log"),
		ready:   make(chan struct{}),
		done:    make(chan struct{}),
	}
	logw, err := os.OpenFile(h.logFile, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("fleet host log: %w", err)
	}
	defer logw.Close() // the child has its own descriptor once started
	argv := f.opts.FleetHost
	h.cmd = exec.Command(argv[0], argv[1:]...)
	h.cmd.Env = append(os.Environ(), f.opts.FleetHostEnv...)
	h.cmd.Stderr = logw
	h.cmd.SysProcAttr = agentProcAttr()
	if h.stdin, err = h.cmd.StdinPipe(); err != nil {
		return err
	}
	out, err := h.cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := h.cmd.Start(); err != nil {
		return fmt.Errorf("start fleet host: %w", err)
	}
	f.host = h
	h.enc = json.NewEncoder(h.stdin)
	f.wg.Add(1)
	go f.readHost(h, out, known)
	t := time.NewTimer(hostReadyTimeout)
	defer t.Stop()
	if err := h.enc.Encode(spec); err != nil {
		// Most likely the host exited first: say so, with its log.
		select {
		case <-h.done:
			return fmt.Errorf("fleet host exited before it was ready: %v%s", h.err, h.logTail())
		case <-t.C:
			return fmt.Errorf("fleet host spec: %w%s", err, h.logTail())
		}
	}
	select {
	case <-h.ready:
		return nil
	case <-h.done:
		return fmt.Errorf("fleet host exited before it was ready: %v%s", h.err, h.logTail())
	case <-t.C:
		return fmt.Errorf("fleet host not ready after %s%s", hostReadyTimeout, h.logTail())
	}
}

// readHost passes the host's events on until its output ends, then waits
// for it. A malformed event stops the host: it is a bug, and the run's
// figures would be wrong.
func (f *Fleet) readHost(h *fleetHost, out io.Reader, known map[string]bool) {
	defer f.wg.Done()
	fail := func(err error) {
		f.mu.Lock()
		f.runErr = append(f.runErr, err)
		f.mu.Unlock()
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 0, 4096), maxHostEventLen)
	readyOnce := sync.OnceFunc(func() { close(h.ready) })
	for sc.Scan() {
		ev, err := decodeHostEvent(sc.Bytes())
		if err == nil && ev.Event != hostReady && !known[ev.Identity] {
			err = fmt.Errorf("%w: %s is not one of the fleet's agents", errHostEvent, ev.Identity)
		}
		if err != nil {
			fail(fmt.Errorf("fleet host: %w", err))
			_ = h.cmd.Process.Kill()
			break
		}
		at := time.Unix(0, ev.At)
		switch ev.Event {
		case hostReady:
			readyOnce()
		case hostStart:
			if f.opts.OnAgentStart != nil {
				f.opts.OnAgentStart(ev.Identity, at)
			}
		case hostMode:
			m, _ := parseMode(ev.Mode) // checked by decodeHostEvent
			observer{f}.ModeChanged(ev.Identity, m, at)
		case hostExit:
			fail(fmt.Errorf("%s: %s", ev.Identity, ev.Error))
		}
	}
	if err := sc.Err(); err != nil {
		fail(fmt.Errorf("fleet host: %w: %v", errHostEvent, err))
		_ = h.cmd.Process.Kill()
	}
	_, _ = io.Copy(io.Discard, out) // after a bad line: let the host finish writing
	h.err = h.cmd.Wait()
	close(h.done)
	f.mu.Lock()
	stopping := f.stopping
	f.mu.Unlock()
	if !stopping {
		fail(fmt.Errorf("fleet host exited: %v%s", h.err, h.logTail()))
	}
}

// startHost tells the fleet host to run its agents, noting its CPU first.
func (f *Fleet) startHost() error {
	h := f.host
	if st, err := procfs.ReadStat(h.cmd.Process.Pid); err == nil {
		h.cpu0 = st.User + st.System
	}
	if err := h.enc.Encode(hostControl{Start: true}); err != nil {
		return fmt.Errorf("start fleet host: %w%s", err, h.logTail())
	}
	return nil
}

// stopHost closes the host's input, which stops its agents, waits up to
// grace for it to exit and then kills it.
func (f *Fleet) stopHost(grace time.Duration) {
	h := f.host
	if h == nil {
		return
	}
	f.mu.Lock()
	f.stopping = true
	f.mu.Unlock()
	_ = h.stdin.Close()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-h.done:
	case <-t.C:
		_ = h.cmd.Process.Kill()
		<-h.done
	}
}

// HostStats reads the fleet host's CPU time since its agents started and
// its resident memory (Linux only). ok is false without a running host.
func (f *Fleet) HostStats() (st ProcessStats, ok bool, err error) {
	h := f.host
	if h == nil {
		return st, false, nil
	}
	select {
	case <-h.done:
		return st, false, nil
	default:
	}
	ps, err := procfs.ReadStat(h.cmd.Process.Pid)
	if err != nil {
		return st, false, err
	}
	st.Processes = 1
	st.CPUSeconds = (ps.User + ps.System - h.cpu0).Seconds()
	st.RSSBytes = float64(ps.RSSPages) * float64(os.Getpagesize())
	return st, true, nil
}

// logTail is the end of the host's log, for an error message.
func (h *fleetHost) logTail() string {
	b, err := os.ReadFile(h.logFile)
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	const keep = 2048
	if len(b) > keep {
		b = b[len(b)-keep:]
	}
	return "; its log (" + h.logFile + ") ends: " + string(bytes.TrimSpace(b))
}

// FleetHostMain is a fleet host on this process's standard input and output
// until its input ends or SIGTERM arrives, and returns the exit code: for
// test binaries that start themselves as the fleet host (their TestMain).
// The muster command's is `muster bench fleet-host`.
func FleetHostMain() int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := ServeFleetHost(ctx, os.Stdin, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// ServeFleetHost is the fleet host (`muster bench fleet-host`): it reads the
// spec of its agents from in, builds them, and runs them when told, writing
// their events to out and their logs to logs, until in ends or ctx is done.
func ServeFleetHost(ctx context.Context, in io.Reader, out, logs io.Writer) error {
	dec := json.NewDecoder(in)
	dec.DisallowUnknownFields()
	var spec hostSpec
	if err := dec.Decode(&spec); err != nil {
		return fmt.Errorf("fleet host spec: %w", err)
	}
	if err := spec.validate(); err != nil {
		return err
	}
	log, _, err := logging.New(spec.LogLevel, "")
	if err != nil {
		return err
	}
	log.SetOutput(logs)
	if limit, ok := openFileLimit(); ok && uint64(len(spec.Agents)+fileReserve) > limit {
		return fmt.Errorf("%d agents need about %d open files and this process may open %d (RLIMIT_NOFILE): raise the limit (ulimit -n)",
			len(spec.Agents), len(spec.Agents)+fileReserve, limit)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w := &hostWriter{w: bufio.NewWriter(out), cancel: cancel}
	agents := make([]*agent.Agent, len(spec.Agents))
	trust := simTrust{brokers: spec.Brokers, provKey: spec.ProvisionerKey, caPEM: []byte(spec.CA)}
	for i, sa := range spec.Agents {
		a, err := newSimAgent(sa, trust, spec.MetadataInterval, log, w, nil)
		if err != nil {
			return err
		}
		agents[i] = a
	}
	if err := w.send(hostEvent{Event: hostReady}); err != nil {
		return err
	}
	var ctl hostControl
	if err := dec.Decode(&ctl); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // stopped before the start
		}
		return fmt.Errorf("fleet host control: %w", err)
	}
	if !ctl.Start {
		return errors.New("fleet host control: expected start")
	}
	go func() {
		// Whatever comes next, or the end of the input, stops the host.
		var more json.RawMessage
		_ = dec.Decode(&more)
		cancel()
	}()
	var wg sync.WaitGroup
	run := func(i int) {
		sa := spec.Agents[i]
		if w.send(hostEvent{Event: hostStart, Identity: sa.Identity, At: time.Now().UnixNano()}) != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := agents[i].Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
				msg := err.Error()
				if len(msg) > maxHostErrorLen {
					msg = msg[:maxHostErrorLen]
				}
				_ = w.send(hostEvent{Event: hostExit, Identity: sa.Identity, Error: msg})
			}
		}()
	}
	start := time.Now()
	t := time.NewTimer(0)
	defer t.Stop()
	for i := range spec.Agents {
		if wait := time.Until(start.Add(spec.Agents[i].Delay)); wait > 0 {
			t.Reset(wait)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
		}
		if ctx.Err() != nil {
			break
		}
		run(i)
	}
	<-ctx.Done()
	wg.Wait()
	return nil
}

// validate checks a fleet-host spec before any agent is built.
func (s *hostSpec) validate() error {
	var errs []error
	if len(s.Brokers) == 0 {
		errs = append(errs, errors.New("no brokers"))
	}
	if s.ProvisionerKey == "" || s.CA == "" {
		errs = append(errs, errors.New("no provisioner key or CA"))
	}
	seen := make(map[string]bool, len(s.Agents))
	for i, a := range s.Agents {
		if err := protocol.ValidateIdentity(a.Identity); err != nil {
			errs = append(errs, fmt.Errorf("agent %d: %w", i, err))
		}
		if seen[a.Identity] {
			errs = append(errs, fmt.Errorf("agent %d: %s twice", i, a.Identity))
		}
		seen[a.Identity] = true
		if a.StateDir == "" || a.Token == "" || a.Delay < 0 {
			errs = append(errs, fmt.Errorf("agent %s: needs a state directory, a token and a delay not negative", a.Identity))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("fleet host spec: %w", err)
	}
	return nil
}

// hostWriter writes the host's events, one line each, and is the agents'
// observer. A write that fails (the fleet is gone) stops the host.
type hostWriter struct {
	mu     sync.Mutex
	w      *bufio.Writer
	cancel context.CancelFunc
	failed bool
}

func (w *hostWriter) send(ev hostEvent) error {
	b, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.failed {
		return syscall.EPIPE
	}
	_, err = w.w.Write(append(b, '\n'))
	if err == nil {
		err = w.w.Flush()
	}
	if err != nil {
		w.failed = true
		if w.cancel != nil {
			w.cancel()
		}
	}
	return err
}

// ModeChanged reports an agent's connection in a mode.
func (w *hostWriter) ModeChanged(identity string, m agent.Mode, at time.Time) {
	_ = w.send(hostEvent{Event: hostMode, Identity: identity, Mode: m.String(), At: at.UnixNano()})
}
