package provisioner

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/claims"
	"github.com/muster-io/muster/internal/nodestate"
	"github.com/muster-io/muster/internal/protocol"
)

// HA modes (config key ha.mode).
const (
	// HASingle: one provisioner; state in memory (and state_dir).
	HASingle = "single"
	// HAClaims: any number of provisioners work at once; each node is
	// claimed by exactly one through a JetStream KV lease; node state and
	// the identity registry live in JetStream KV.
	HAClaims = "claims"
	// HALeader: any number of provisioners, one active (holder of the
	// leader lease), the others on standby; state as in HAClaims.
	HALeader = "leader"
)

// StateElsewhere: another provisioner holds the node's claim, or this
// one's attempt lost it; it is looked at again when it next announces
// itself.
const StateElsewhere State = "elsewhere"

// HAConfig is the ha section of the configuration.
type HAConfig struct {
	// Mode is single (default), claims or leader.
	Mode string `yaml:"mode"`
	// Lease is how long a claim (or leadership) outlives its holder: a
	// crashed provisioner's nodes are picked up by another within about a
	// lease. Default 3s.
	Lease Duration `yaml:"lease"`
	// Replicas of the KV buckets: 1, or 3 on a three-broker cluster.
	Replicas int `yaml:"replicas"`
}

// DefaultLease is the default ha.lease.
const DefaultLease = 3 * time.Second

func (h *HAConfig) validate(bad func(key string, val any, why string)) {
	switch h.Mode {
	case "", HASingle, HAClaims, HALeader:
	default:
		bad("ha.mode", fmt.Sprintf("%q", h.Mode), "must be single, claims or leader")
	}
	if h.Lease.D() != 0 && (h.Lease.D() < claims.MinLease || h.Lease.D() > time.Minute) {
		bad("ha.lease", h.Lease, "must be 2s..1m")
	}
	if h.Replicas < 0 || h.Replicas > 5 {
		bad("ha.replicas", h.Replicas, "must be 1..5 (0 means 1)")
	}
}

// shared is a provisioner's view of the JetStream state it shares with its
// peers (nil in single mode).
type shared struct {
	mode     string
	claims   *claims.Store
	nodes    *nodestate.Store
	arrivals jetstream.Consumer
	grace    time.Duration
}

// ArrivalsStream is the JetStream stream (ha modes claims and leader) that
// keeps the provisioned lifecycle events nodes publish from production, as
// the provisioning account sees them. Provisioners share one durable
// consumer of it (ArrivalsConsumer), so each arrival is recorded in the
// shared node state by one of them, including arrivals while every
// provisioner was down.
const (
	ArrivalsStream   = "MUSTER_ARRIVALS"
	ArrivalsConsumer = "muster-provisioners"
	// arrivalsSubject is what the stream keeps.
	arrivalsSubject = "production." + protocol.LifecyclePrefix + "." + protocol.EventProvisioned + ".>"
	// arrivalsMaxAge and arrivalsMaxBytes bound the stream: long enough
	// for a provisioner set to be down a while, small for the events.
	arrivalsMaxAge   = 24 * time.Hour
	arrivalsMaxBytes = 256 << 20
)

// openShared opens the claims, node state and registry buckets and the
// arrivals stream.
func (p *Provisioner) openShared(ctx context.Context, nc *nats.Conn) error {
	mode := p.cfg.HA.Mode
	if mode == "" || mode == HASingle {
		return nil
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("ha: jetstream: %w", err)
	}
	lease := p.cfg.HA.Lease.D()
	if lease == 0 {
		lease = DefaultLease
	}
	octx, cancel := context.WithTimeout(ctx, sharedOpenTimeout)
	defer cancel()
	var (
		cs       *claims.Store
		ns       *nodestate.Store
		reg      *kvRegistry
		arrivals jetstream.Consumer
	)
	opens := []struct {
		what string
		open func(context.Context) error
	}{
		{"claims bucket", func(ctx context.Context) (err error) {
			cs, err = claims.New(ctx, js, claims.Config{Owner: p.cfg.Name, Lease: lease, Replicas: p.cfg.HA.Replicas})
			return err
		}},
		{"node state bucket", func(ctx context.Context) (err error) {
			ns, err = nodestate.New(ctx, js, "", p.cfg.HA.Replicas)
			return err
		}},
		{"registry bucket", func(ctx context.Context) (err error) {
			reg, err = openKVRegistry(ctx, js, p.cfg.HA.Replicas)
			return err
		}},
		{"arrivals stream", func(ctx context.Context) (err error) {
			arrivals, err = openArrivals(ctx, js, p.cfg.HA.Replicas)
			return err
		}},
	}
	// In parallel: a create that goes unanswered costs one attempt's
	// timeout, not one per bucket.
	errs := make([]error, len(opens))
	var wg sync.WaitGroup
	for i, o := range opens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = p.retryOpen(octx, o.what, o.open)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ha: %w", err)
	}
	if err := p.importFileRegistry(reg); err != nil {
		return fmt.Errorf("ha: %w", err)
	}
	p.mu.Lock()
	p.shared = &shared{mode: mode, claims: cs, nodes: ns, arrivals: arrivals, grace: p.cfg.Grace.D()}
	p.reg = reg
	p.mu.Unlock()
	if err := p.loadDenied(); err != nil {
		return fmt.Errorf("ha: identity registry: %w", err)
	}
	p.log.WithFields(logrus.Fields{"mode": mode, "lease": lease.String(), "replicas": max(1, p.cfg.HA.Replicas)}).Info("sharing state through JetStream")
	return nil
}

// sharedOpenTimeout bounds opening the shared state at start;
// sharedOpenTry bounds one attempt.
const (
	sharedOpenTimeout = time.Minute
	sharedOpenTry     = 3 * time.Second
)

// retryOpen runs open with a short timeout until it succeeds or ctx ends.
// Creating a replicated bucket goes unanswered when several provisioners
// create it at the same moment on a fresh cluster (measured with three:
// none of them got a reply, although the bucket was made; the next
// request succeeds at once), so each attempt is short and is repeated.
func (p *Provisioner) retryOpen(ctx context.Context, what string, open func(context.Context) error) error {
	for try := 1; ; try++ {
		tctx, cancel := context.WithTimeout(ctx, sharedOpenTry)
		err := open(tctx)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		p.log.WithError(err).WithFields(logrus.Fields{"what": what, "attempt": try}).Warn("opening the shared state; retrying")
		t := time.NewTimer(200 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
}

// openArrivals creates (or updates) the arrivals stream and its shared
// durable consumer.
func openArrivals(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.Consumer, error) {
	st, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        ArrivalsStream,
		Description: "Muster: provisioned lifecycle events from production, recorded in the node state by one provisioner each",
		Subjects:    []string{arrivalsSubject},
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxAge:      arrivalsMaxAge,
		MaxBytes:    arrivalsMaxBytes,
		MaxMsgSize:  protocol.MaxMessageSize,
		Storage:     jetstream.FileStorage,
		Replicas:    max(1, replicas),
	})
	if err != nil {
		return nil, fmt.Errorf("arrivals stream %s: %w", ArrivalsStream, err)
	}
	c, err := st.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
		Durable:       ArrivalsConsumer,
		Description:   "Muster provisioners recording node arrivals",
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       30 * time.Second,
		MaxDeliver:    20,
		MaxAckPending: 1024,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		Replicas:      max(1, replicas),
	})
	if err != nil {
		return nil, fmt.Errorf("arrivals consumer %s: %w", ArrivalsConsumer, err)
	}
	return c, nil
}

// arrivalsLoop records node arrivals from the arrivals stream until ctx
// ends.
func (p *Provisioner) arrivalsLoop(ctx context.Context) {
	sh := p.shared
	cc, err := sh.arrivals.Consume(func(m jetstream.Msg) {
		// Bound to its subject like every lifecycle event: the broker lets
		// a production node publish only as its certificate's identity.
		ev, err := protocol.DecodeEventFrom(strings.TrimPrefix(m.Subject(), productionPrefix), m.Data())
		if err != nil || ev.Type != protocol.EventProvisioned {
			_ = m.Term()
			return
		}
		if err := p.recordArrival(ctx, ev); err != nil {
			if ctx.Err() == nil {
				p.log.WithError(err).WithField("identity", ev.Identity).Warn("could not record a node's arrival; retrying")
			}
			_ = m.NakWithDelay(time.Second)
			return
		}
		_ = m.Ack()
	}, jetstream.PullMaxMessages(64), jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		if ctx.Err() == nil {
			p.log.WithError(err).Debug("arrivals consumer")
		}
	}))
	if err != nil {
		p.log.WithError(err).Error("cannot consume node arrivals; arrivals of nodes whose restart was not confirmed go unrecorded")
		return
	}
	<-ctx.Done()
	cc.Stop()
}

// seenArrivalsBuffer bounds the arrivals waiting for seenArrivalsLoop.
const seenArrivalsBuffer = 1024

// seenArrivalsLoop records the arrivals markProduction queued, until ctx
// ends. Each costs a read of the node's record; a write only when it
// completes or moves the record.
func (p *Provisioner) seenArrivalsLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-p.seenArrivals:
			if err := p.recordArrival(ctx, ev); err != nil && ctx.Err() == nil {
				p.log.WithError(err).WithField("identity", ev.Identity).Debug("could not record a node's arrival (the arrivals stream has it too)")
			}
		}
	}
}

// recordArrival records in the shared node state that a node came to
// production with the certificate its event names. When that completes a
// certificate that was configured but whose completion was unknown (the
// provisioner, or the node, died before restart was confirmed), the node
// is counted provisioned and its key recorded in the identity registry.
func (p *Provisioner) recordArrival(ctx context.Context, ev *protocol.Event) error {
	sh := p.shared
	if ev.Serial == "" {
		return nil
	}
	rctx, cancel := context.WithTimeout(ctx, sh.claims.Lease())
	defer cancel()
	cur, err := sh.nodes.Get(rctx, ev.Identity)
	if errors.Is(err, nodestate.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if pd := cur.PendingFor(ev.Serial); pd != nil {
		// The key first, then the count: a failure here leaves the
		// certificate pending, and the arrival is tried again.
		if err := p.registerArrival(ev, pd); err != nil {
			return fmt.Errorf("identity registry: %w", err)
		}
	} else if cur.Serial != ev.Serial || cur.State == nodestate.StateProduction {
		return nil // unknown certificate, or recorded already
	}
	var done *nodestate.Pending
	_, err = sh.nodes.Update(rctx, ev.Identity, func(r *nodestate.Record) (bool, error) {
		done = nil
		pending := r.PendingFor(ev.Serial) != nil
		if !pending && (r.Serial != ev.Serial || r.State == nodestate.StateProduction) {
			return false, nil
		}
		done = r.Complete(ev.Serial, time.Now(), ev.Time)
		return true, nil
	})
	if err != nil {
		return err
	}
	if done == nil {
		return nil
	}
	p.m.completedOnArrival.Inc()
	p.log.WithFields(logrus.Fields{"identity": ev.Identity, "configured_by": done.By}).Info("node arrived in production before its restart was confirmed; counted provisioned")
	p.recordTokenUse(done.TokenID, ev.Identity)
	return nil
}

// registerArrival records in the identity registry the key of the pending
// certificate a node arrived with, unless the registry has it already
// (the provisioner that configured the node wrote it when configure was
// acknowledged).
func (p *Provisioner) registerArrival(ev *protocol.Event, pd *nodestate.Pending) error {
	if have, ok, err := p.reg.Get(ev.Identity); err == nil && ok && have.Serial == ev.Serial && have.KeyFingerprint == pd.KeyFingerprint {
		return nil
	}
	return p.reg.Put(Record{Identity: ev.Identity, KeyFingerprint: pd.KeyFingerprint, Serial: ev.Serial, ProvisionedAt: time.Now().UTC(), TokenID: pd.TokenID})
}

// notListening reports whether an RPC error says nothing listens on the
// node's provisioning subject (no responders, which NATS knows for sure; a
// timeout could be a slow node): the node is not in provisioning mode.
func notListening(err error) bool {
	return errors.Is(err, nats.ErrNoResponders)
}

// errElsewhere: the node is another provisioner's (claimed, or finished
// within the grace period).
var errElsewhere = errors.New("node handled by another provisioner")

// heldClaim is a node claim held for one attempt.
type heldClaim struct {
	c *claims.Claim
	// ctx ends when the claim is lost (cause wraps claims.ErrLost) or the
	// attempt is released.
	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup
	// prior is the shared record's state and stage before the claim set
	// them to in progress.
	prior, priorStage string
}

// lost reports whether the claim was lost (another provisioner may hold
// the node now).
func (h *heldClaim) lost() bool { return errors.Is(context.Cause(h.ctx), claims.ErrLost) }

// claimNode claims identity for this provisioner and records the attempt in
// the shared state. The claim's context ends when the claim is lost (the
// attempt must stop). errElsewhere when another provisioner has the node,
// or finished it: provisioned within grace, or in production, unless the
// announcement that queued it names a life begun since it arrived there (it
// was reprovisioned; nodeLife.newer): then an *inProduction.
func (p *Provisioner) claimNode(ctx context.Context, identity string, l nodeLife) (*heldClaim, error) {
	sh := p.shared
	c, err := sh.claims.Claim(ctx, identity)
	if errors.Is(err, claims.ErrClaimed) {
		return nil, errElsewhere
	}
	if err != nil {
		return nil, err
	}
	octx, ocancel := context.WithTimeout(ctx, sh.claims.Lease())
	var prior, priorStage string
	_, err = sh.nodes.Update(octx, identity, func(r *nodestate.Record) (bool, error) {
		prior, priorStage = r.State, r.Stage
		switch {
		case r.State == string(StateProvisioned) && time.Since(r.ProvisionedAt) < sh.grace:
			return false, errElsewhere
		case r.State == string(StateProduction) && !l.newer(r.Life, r.ArrivedAt):
			return false, &inProduction{life: r.Life, arrivedAt: r.ArrivedAt}
		}
		r.State, r.Stage, r.ClaimedBy, r.LastError = string(StateInProgress), string(StageInventory), sh.claims.Owner(), ""
		r.Attempts++
		if r.DiscoveredAt.IsZero() {
			r.DiscoveredAt = time.Now().UTC()
		}
		return true, nil
	})
	ocancel()
	if err != nil {
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), sh.claims.Lease())
		_ = c.Release(rctx)
		rcancel()
		return nil, err
	}
	hctx, cancel := context.WithCancelCause(ctx)
	h := &heldClaim{c: c, ctx: hctx, cancel: cancel, prior: prior, priorStage: priorStage}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		c.Hold(hctx, func(err error) {
			p.log.WithField("identity", identity).WithError(err).Warn("claim lost; stopping this node's attempt")
			cancel(err)
		})
	}()
	return h, nil
}

// releaseClaim ends an attempt's claim: renewals stop and the claim is
// deleted unless it was lost (the delete is a compare-and-set on this
// holder's revision, so it never removes another's).
func (p *Provisioner) releaseClaim(identity string, h *heldClaim) {
	h.cancel(nil)
	h.wg.Wait()
	rctx, rcancel := context.WithTimeout(context.Background(), p.shared.claims.Lease())
	defer rcancel()
	if err := h.c.Release(rctx); err != nil {
		p.log.WithError(err).WithField("identity", identity).Debug("release claim")
	}
}

// confirmClaim runs just before configure: it renews the claim (so it is
// this provisioner's for a lease from now, and the node is not configured
// by two provisioners at once) and records the certificate about to be
// sent as pending, so that the node's arrival in production with it
// completes the provisioning even if this provisioner dies before restart.
func (p *Provisioner) confirmClaim(ctx context.Context, a *attempt) error {
	sh := p.shared
	rctx, cancel := context.WithTimeout(ctx, sh.claims.Lease()/3)
	err := a.hold.c.Renew(rctx)
	cancel()
	if err != nil {
		if errors.Is(err, claims.ErrLost) {
			a.hold.cancel(err)
		}
		return fmt.Errorf("confirm the claim before configure: %w", err)
	}
	if a.serial == "" {
		return nil
	}
	octx, ocancel := context.WithTimeout(ctx, sh.claims.Lease())
	defer ocancel()
	_, err = sh.nodes.Update(octx, a.id, func(r *nodestate.Record) (bool, error) {
		r.State, r.Stage, r.ClaimedBy = string(StateInProgress), string(StageConfigure), sh.claims.Owner()
		r.SetPending(nodestate.Pending{Serial: a.serial, KeyFingerprint: a.keyFP, TokenID: a.tokenID, Life: a.life, By: sh.claims.Owner(), At: time.Now().UTC()})
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("record the certificate before configure: %w", err)
	}
	return nil
}

// recordShared writes the outcome of an attempt to the shared node state,
// while this provisioner still holds the claim (nothing is written when the
// claim was lost: the node is someone else's now). It returns the attempt's
// error, or nil when the attempt failed after configure but the node has
// meanwhile arrived in production with the certificate it was sent (its
// restart could not be confirmed, but it is provisioned).
func (p *Provisioner) recordShared(a *attempt, err error, abandoned bool) error {
	sh := p.shared
	if a.hold.lost() {
		return err
	}
	stage := a.stage
	var se *stageError
	if errors.As(err, &se) {
		stage = se.stage
	}
	arrivedAt := p.arrivedWith(a.id, a.serial)
	ctx, cancel := context.WithTimeout(context.Background(), sh.claims.Lease())
	defer cancel()
	arrived := false
	var done *nodestate.Pending
	_, werr := sh.nodes.Update(ctx, a.id, func(r *nodestate.Record) (bool, error) {
		now := time.Now()
		arrived, done = false, nil
		r.ClaimedBy = ""
		var he *holdError
		switch {
		case err != nil && !arrivedAt.IsZero():
			// This provisioner saw the node arrive with the certificate
			// it sent, whatever the attempt's last request got.
			done = r.Complete(a.serial, now, arrivedAt)
			arrived = true
		case err == nil && a.outcome == OutcomeProvisioned && a.serial == "":
			r.Provisions++
			r.State, r.Stage, r.LastError = string(StateProvisioned), "", ""
			r.ProvisionedAt, r.ProvisionedBy = now.UTC(), sh.claims.Owner()
		case err == nil && a.outcome == OutcomeProvisioned:
			if r.Complete(a.serial, now, arrivedAt) == nil && r.Serial != a.serial {
				// The pending record was lost (an operator edited the
				// bucket): count the provisioning all the same.
				r.SetPending(nodestate.Pending{Serial: a.serial, Life: a.life, By: sh.claims.Owner()})
				r.Complete(a.serial, now, arrivedAt)
			}
		case err == nil:
			r.State, r.Stage, r.LastError = string(stateOf(a.outcome)), string(stage), ""
		case r.Arrived(a.serial):
			arrived = true
		case errors.As(err, &he):
			r.State, r.Stage, r.LastError = string(StateHeld), string(stage), he.Error()
			if he.denied {
				r.State = string(StateDenied)
			}
		case abandoned:
			r.State, r.Stage, r.LastError = string(StateAbandoned), string(stage), ErrAbandoned.Error()
		case !a.configured && notListening(err) && r.State == nodestate.StateProduction:
			// The node's arrival in production was recorded while this
			// attempt ran (taken on an announcement of the life it has
			// since left, its arrival delayed, say, by a stream leader
			// election): it does not listen in provisioning mode and no
			// configuration reached it. Its record stays in production.
		case stage == StageInventory && notListening(err) && a.hold.prior == nodestate.StateProduction:
			// Taken on a stale announcement: the node is in production
			// (its arrival recorded) and does not listen in provisioning
			// mode. Nothing was sent to it; its record stays what it was.
			r.State, r.Stage, r.LastError = a.hold.prior, a.hold.priorStage, ""
		default:
			r.State, r.Stage, r.LastError = string(StateFailed), string(stage), err.Error()
		}
		return true, nil
	})
	if werr != nil {
		a.log.WithError(werr).Warn("could not record node state")
	}
	if done != nil && !a.configured {
		// Counted from the arrival, configure was never acknowledged:
		// record the key now.
		rctx, rcancel := context.WithTimeout(context.Background(), registryRetryFor)
		if rerr := p.recordConfigured(rctx, a); rerr != nil {
			a.log.WithError(rerr).Error("the node is provisioned, but its key is not in the identity registry")
		}
		rcancel()
	}
	if arrived {
		a.log.WithField("stage", string(stage)).WithError(err).Info("node arrived in production with the certificate it was sent; provisioned although the attempt did not see it through")
		a.outcome = OutcomeProvisioned
		return nil
	}
	return err
}

// stateOf is the node state an attempt's outcome (without error) leaves.
func stateOf(o Outcome) State {
	switch o {
	case OutcomeDeferred:
		return StateDeferred
	case OutcomeShutdown:
		return StateShutdown
	}
	return StateProvisioned
}

// arrivedWith returns the time of the provisioned event in which the node
// reported the certificate serial, as this provisioner saw it; zero when it
// did not.
func (p *Provisioner) arrivedWith(identity, serial string) time.Time {
	if serial == "" {
		return time.Time{}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := p.nodes[identity]; n != nil && n.arrivedSerial == serial {
		return n.arrivedAt
	}
	return time.Time{}
}

// inProduction is claimNode's errElsewhere for a node the shared record has
// in production, provisioned in life and arrived at arrivedAt (its clock),
// with no new life since.
type inProduction struct {
	life      string
	arrivedAt time.Time
}

func (e *inProduction) Error() string { return "in production, in the life it was provisioned in" }
func (e *inProduction) Unwrap() error { return errElsewhere }

// backToProduction puts a node in progress back in production, as the
// shared record has it: the announcement that queued it came from the life
// the node was provisioned in (late), or from one that began before it
// arrived. Its life and arrival are the record's from now on, so that the
// old life's next announcement is dropped at once.
func (p *Provisioner) backToProduction(identity string, ip *inProduction) {
	now := time.Now()
	p.mu.Lock()
	if n := p.nodes[identity]; n != nil && n.State == StateInProgress {
		p.setState(n, StateProduction)
		n.Stage = ""
		n.Attempts--
		n.Updated = now
		if ip.life != "" {
			n.Life = ip.life
		}
		if n.productionSince.IsZero() {
			n.productionSince = ip.arrivedAt
		}
	}
	p.mu.Unlock()
}

// markElsewhere parks a node another provisioner has: looked at again after
// a lease (if that provisioner dies, its claim lapses and the node, still
// announcing itself, comes back here).
func (p *Provisioner) markElsewhere(identity string) {
	now := time.Now()
	p.mu.Lock()
	if n := p.nodes[identity]; n != nil && n.State == StateInProgress {
		p.setState(n, StateElsewhere)
		n.Attempts--
		n.Updated = now
		n.RetryAt = now.Add(p.shared.claims.Lease())
	}
	p.mu.Unlock()
}

// leaderLoop keeps trying to become the active provisioner and holds the
// role while it can; the provisioner stands by (no worker takes a node)
// whenever it is not the leader.
func (p *Provisioner) leaderLoop(ctx context.Context) {
	sh := p.shared
	t := time.NewTicker(sh.claims.Lease() / 3)
	defer t.Stop()
	for {
		c, err := sh.claims.Claim(ctx, claims.LeaderKey)
		if err == nil {
			p.setStandby(false)
			p.log.Info("became the active provisioner")
			c.Hold(ctx, func(err error) {
				p.log.WithError(err).Warn("lost leadership; standing by")
			})
			p.setStandby(true)
			if ctx.Err() != nil {
				rctx, cancel := context.WithTimeout(context.Background(), sh.claims.Lease())
				_ = c.Release(rctx) // let a standby take over at once
				cancel()
				return
			}
		} else if !errors.Is(err, claims.ErrClaimed) && ctx.Err() == nil {
			p.log.WithError(err).Warn("leader election")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// setStandby switches standby (leader mode) on or off.
func (p *Provisioner) setStandby(v bool) { p.setGateFlag(&p.standby, v, p.m.standby) }

// Active reports whether this provisioner takes nodes: not paused and, in
// leader mode, the leader.
func (p *Provisioner) Active() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.paused && !p.standby
}
