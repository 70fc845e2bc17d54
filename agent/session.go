package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/patience"
	"github.com/muster-io/muster/internal/protocol"
)

// msgBuffer is the per-agent buffer of received requests.
const msgBuffer = 256

// flushTimeout bounds the flush of replies before a connection closes.
const flushTimeout = 2 * time.Second

// outReconnect: the production connection closed; connect again.
const outReconnect outcome = 100

func (a *Agent) runProvisioning(ctx context.Context, d Decision) (outcome, error) {
	s := &session{
		a:              a,
		mode:           ModeProvisioning,
		started:        time.Now().UTC(),
		life:           protocol.NewLife(),
		cfg:            d.Config,
		facts:          a.currentFacts(),
		collectives:    []string{protocol.ProvisioningCollective},
		mainCollective: protocol.ProvisioningCollective,
		nodeSubject:    protocol.NodeSubject(protocol.ProvisioningCollective, a.id),
		agents:         []string{protocol.AgentDiscovery, protocol.AgentRPCUtil, protocol.AgentProvision},
	}
	connected, reconnected := make(chan struct{}, 1), make(chan struct{}, 1)
	link := a.provisioningLink()
	// A node waiting to be provisioned keeps trying, also through
	// refusals: nats.go otherwise closes the connection for good after the
	// same authorization error twice from one broker, and a broker refuses
	// a node for a while when it still holds the connection of an attempt
	// the node gave up, or before the node's token is valid by its clock.
	opts := append(a.baseOptions(link, patience.New(link.connectTimeout(), link.dialTimeout(), a.inProcess, a.log), connected, reconnected, nil),
		nats.RetryOnFailedConnect(true), nats.IgnoreAuthErrorAbort())
	if a.prov.Token != "" {
		// The broker admits unprovisioned nodes only with a valid token.
		opts = append(opts, nats.Token(a.prov.Token))
	}
	urls := nats.DefaultURL
	if a.inProcess != nil {
		if len(a.prov.Brokers) > 0 {
			urls, _ = urlList(a.prov.Brokers)
		}
	} else {
		var err error
		if urls, err = urlList(a.prov.Brokers); err != nil {
			return 0, fmt.Errorf("provisioning mode: %w", err)
		}
		tc, err := a.provisioningTLS()
		if err != nil {
			return 0, fmt.Errorf("provisioning mode: %w", err)
		}
		opts = append(opts, nats.Secure(tc))
	}
	nc, err := nats.Connect(urls, opts...)
	if err != nil {
		return 0, fmt.Errorf("connect to provisioning brokers: %w", err)
	}
	defer nc.Close()
	msgs := make(chan *nats.Msg, msgBuffer)
	for _, subj := range []string{
		s.nodeSubject,
		protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentDiscovery),
		protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentRPCUtil),
	} {
		if _, err := nc.ChanSubscribe(subj, msgs); err != nil {
			return 0, fmt.Errorf("subscribe %s: %w", subj, err)
		}
	}
	return s.loop(ctx, nc, msgs, connected, reconnected, nil, nil), nil
}

func (a *Agent) runProduction(ctx context.Context, d Decision) (outcome, error) {
	cfg := d.Config
	main := cfg.Value(config.KeyMainCollective)
	if main == "" {
		main = protocol.DefaultMainCollective
	}
	collectives := splitList(cfg.Value(config.KeyCollectives))
	if len(collectives) == 0 {
		collectives = []string{main}
	}
	s := &session{
		a:              a,
		mode:           ModeProduction,
		cfg:            cfg,
		facts:          a.currentFacts(),
		collectives:    collectives,
		mainCollective: main,
		nodeSubject:    protocol.NodeSubject(main, a.id),
		agents:         []string{protocol.AgentRPCUtil, protocol.AgentProvision},
		arrivalID:      nuid.Next(),
		serial:         d.Serial,
	}
	urls, err := urlList([]string{cfg.Value(config.KeyMiddlewareHosts)})
	if err != nil {
		return 0, fmt.Errorf("production mode: %s: %w", config.KeyMiddlewareHosts, err)
	}
	var expiry <-chan time.Time
	if !d.NotAfter.IsZero() {
		t := time.NewTimer(time.Until(d.NotAfter))
		defer t.Stop()
		expiry = t.C
	}
	link := a.productionLink(cfg)
	pat := patience.New(link.connectTimeout(), link.dialTimeout(), a.inProcess, a.log)
	refused, rounds := 0, 0
	for {
		if ctx.Err() != nil {
			return outDone, nil
		}
		if !d.NotAfter.IsZero() && time.Now().After(d.NotAfter) {
			a.log.Warn("certificate expired; falling back to provisioning mode")
			return outFallback, nil
		}
		connected, reconnected := make(chan struct{}, 1), make(chan struct{}, 1)
		closed := make(chan struct{}, 1)
		opts := append(a.baseOptions(link, pat, connected, reconnected, closed), nats.MaxReconnects(10))
		// Mutual TLS, also over in-process connections: the broker puts a
		// node in PRODUCTION only for a verified certificate.
		tc, err := productionTLS(cfg.Value(config.KeyCertificate), cfg.Value(config.KeyKey), cfg.Value(config.KeyCA))
		if err != nil {
			return 0, fmt.Errorf("production mode: %w", err)
		}
		if a.inProcess != nil {
			// The pipe never leaves this process: no eavesdropper to keep
			// out, so skip the post-quantum hybrid key exchange (about a
			// fifth of a handshake's CPU); authentication is unchanged.
			tc.CurvePreferences = []tls.CurveID{tls.X25519}
		}
		opts = append(opts, nats.Secure(tc))
		nc, err := nats.Connect(urls, opts...)
		if errors.Is(err, nats.ErrSecureConnWanted) && a.inProcess != nil {
			// An in-process server without TLS (tests, embedding): the
			// connection never leaves the process, so connect in the
			// clear; the broker still decides the account.
			nc, err = nats.Connect(urls, opts[:len(opts)-1]...)
		}
		if err != nil {
			if isRefusal(err) {
				refused++
				a.log.WithError(err).WithField("refused", refused).Warn("production broker refused the connection")
				if refused >= a.fallbackN {
					a.log.Warnf("production brokers refused %d connections in a row; falling back to provisioning mode", refused)
					return outFallback, nil
				}
			} else {
				refused = 0
				a.log.WithError(err).Warn("could not connect to the production brokers")
			}
			rounds++
			t := time.NewTimer(link.backoff(rounds))
			select {
			case <-ctx.Done():
				t.Stop()
				return outDone, nil
			case <-expiry:
				t.Stop()
				a.log.Warn("certificate expired; falling back to provisioning mode")
				return outFallback, nil
			case <-t.C:
			}
			continue
		}
		refused, rounds = 0, 0
		out, err := s.serveProduction(ctx, nc, connected, reconnected, closed, expiry)
		nc.Close()
		if err != nil {
			return 0, err
		}
		if out != outReconnect {
			return out, nil
		}
		a.log.Warn("lost the production brokers; connecting again")
	}
}

func (s *session) serveProduction(ctx context.Context, nc *nats.Conn, connected, reconnected, closed <-chan struct{}, expiry <-chan time.Time) (outcome, error) {
	msgs := make(chan *nats.Msg, msgBuffer)
	for _, subj := range []string{s.nodeSubject, protocol.BroadcastSubject(s.mainCollective, protocol.AgentRPCUtil)} {
		if _, err := nc.ChanSubscribe(subj, msgs); err != nil {
			return 0, fmt.Errorf("subscribe %s: %w", subj, err)
		}
	}
	return s.loop(ctx, nc, msgs, connected, reconnected, closed, expiry), nil
}

// loop serves one connection until the context ends, a restart or shutdown
// is due, or (production) the connection closes.
//
// Announcements are core NATS messages: a broker that dies holding one in
// its buffers loses it. So after every reconnection the agent announces
// itself again: a waiting node its metadata (provisioners pick it up again
// without waiting for the next interval), a production node its
// provisioned event with the same ID as before (one arrival, counted once
// by consumers that go by the ID). A broker can also lose the first
// announcement of a production connection without the connection breaking
// (a JetStream leader election, say), so a production node publishes its
// provisioned event again a few times (Options.ArrivalRepeat).
func (s *session) loop(ctx context.Context, nc *nats.Conn, msgs <-chan *nats.Msg, connected, reconnected, closed <-chan struct{}, expiry <-chan time.Time) outcome {
	a := s.a
	var mdC <-chan time.Time
	var mdTimer *time.Timer
	defer func() {
		if mdTimer != nil {
			mdTimer.Stop()
		}
	}()
	var restartC <-chan time.Time
	var restartTimer *time.Timer
	defer func() {
		if restartTimer != nil {
			restartTimer.Stop()
		}
	}()
	var arrC <-chan time.Time
	var arrTimer *time.Timer
	defer func() {
		if arrTimer != nil {
			arrTimer.Stop()
		}
	}()
	arrDelay, arrLeft := a.arrRepeat, arrivalRepeats
	// A node waiting to be provisioned that cannot reach a broker says so,
	// with the last error, every other metadata interval: nats.go reports
	// only the first failed attempt, and a broker's refusal never.
	var waitC <-chan time.Time
	var waitTimer *time.Timer
	if s.mode == ModeProvisioning {
		waitTimer = time.NewTimer(2 * a.mdInterval)
		defer waitTimer.Stop()
		waitC = waitTimer.C
	}
	announced := false
	for {
		select {
		case <-ctx.Done():
			return outDone
		case <-closed:
			return outReconnect
		case <-expiry:
			a.log.Warn("certificate expired; falling back to provisioning mode")
			return outFallback
		case <-waitC:
			s.notConnected(nc)
			waitTimer.Reset(2 * a.mdInterval)
		case <-connected:
			if waitTimer != nil {
				waitTimer.Stop()
				waitC = nil
			}
			if announced {
				continue
			}
			announced = true
			now := time.Now()
			if s.mode == ModeProvisioning {
				a.publishEvent(nc, protocol.Event{ID: nuid.Next(), Type: protocol.EventStartup, Time: now, Life: s.life})
				a.publishMetadata(nc, s, now)
				mdTimer = time.NewTimer(jitter(a.mdInterval, 0.25))
				mdC = mdTimer.C
			} else {
				a.publishEvent(nc, s.arrival(now))
				if arrDelay > 0 {
					arrTimer = time.NewTimer(jitter(arrDelay, 0.25))
					arrC = arrTimer.C
				}
			}
			a.log.WithField("broker", nc.ConnectedUrlRedacted()).Infof("connected in %s mode", s.mode)
			if a.observer != nil {
				a.observer.ModeChanged(a.id, s.mode, now)
			}
		case <-reconnected:
			if !announced {
				continue
			}
			if s.mode == ModeProvisioning {
				a.publishMetadata(nc, s, time.Now())
			} else {
				a.publishEvent(nc, s.arrival(time.Now()))
			}
		case <-mdC:
			a.publishMetadata(nc, s, time.Now())
			mdTimer.Reset(jitter(a.mdInterval, 0.25))
		case <-arrC:
			a.publishEvent(nc, s.arrival(time.Now()))
			if arrLeft--; arrLeft > 0 {
				arrDelay *= 5
				arrTimer.Reset(jitter(arrDelay, 0.25))
			} else {
				arrC = nil
			}
		case <-restartC:
			_ = nc.FlushTimeout(flushTimeout)
			return outRestart
		case m := <-msgs:
			res := s.handle(m.Subject, m.Data, time.Now())
			if res.reply != nil && m.Reply != "" {
				if err := nc.Publish(m.Reply, res.reply); err != nil {
					a.log.WithError(err).Warn("could not send a reply")
				}
			}
			switch res.act {
			case actRestart:
				if restartTimer == nil {
					a.log.WithField("splay", res.splay.String()).Info("restart scheduled")
					restartTimer = time.NewTimer(res.splay)
					restartC = restartTimer.C
				}
			case actQuiet:
				// Deferred by the provisioner: the next announcement comes
				// after the delay (jittered, so a deferred batch does not
				// come back at once).
				if mdTimer != nil {
					mdTimer.Reset(jitter(res.splay, 0.1))
				}
			case actShutdown:
				a.publishEvent(nc, protocol.Event{ID: nuid.Next(), Type: protocol.EventShutdown, Time: time.Now()})
				_ = nc.FlushTimeout(flushTimeout)
				return outShutdown
			}
		}
	}
}

// notConnected logs that the session has no broker yet, for how long, and
// the last attempt's error if nats.go still holds it.
func (s *session) notConnected(nc *nats.Conn) {
	e := s.a.log.WithField("waited", time.Since(s.started).Round(time.Second).String())
	if err := nc.LastError(); err != nil {
		e = e.WithError(err)
	}
	e.Warn("not connected to a provisioning broker yet")
}

// arrival is the provisioned event of this production session: the same ID
// every time it is announced.
func (s *session) arrival(now time.Time) protocol.Event {
	return protocol.Event{ID: s.arrivalID, Type: protocol.EventProvisioned, Time: now, Serial: s.serial}
}

// publishEvent publishes ev (its ID, Type, Time, Serial and Life set) as this
// agent's lifecycle event.
func (a *Agent) publishEvent(nc *nats.Conn, ev protocol.Event) {
	ev.Protocol = protocol.EventProtocol
	ev.Identity = a.id
	ev.Component = protocol.AgentComponent
	ev.Time = ev.Time.UTC()
	ev.Version = a.version
	data, err := protocol.Marshal(ev)
	if err == nil {
		err = nc.Publish(protocol.LifecycleSubject(ev.Type, protocol.AgentComponent, a.id), data)
	}
	if err != nil {
		a.log.WithError(err).WithField("event", ev.Type).Warn("could not publish lifecycle event")
	}
}

func (a *Agent) publishMetadata(nc *nats.Conn, s *session, now time.Time) {
	md := protocol.Metadata{
		Protocol: protocol.MetadataProto,
		Identity: a.id,
		Time:     now.UTC(),
		Started:  s.started,
		Life:     s.life,
		Version:  a.version,
		Facts:    s.facts,
	}
	data, err := protocol.Marshal(md)
	if err == nil {
		err = nc.Publish(protocol.MetadataSubjectFor(a.id), data)
	}
	if err != nil {
		a.log.WithError(err).Warn("could not publish metadata")
	}
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
