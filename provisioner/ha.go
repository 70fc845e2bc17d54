package provisioner

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/claims"
	"github.com/muster-io/muster/internal/nodestate"
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

// StateElsewhere: another provisioner holds the node's claim; it is looked
// at again after a lease.
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
	mode   string
	claims *claims.Store
	nodes  *nodestate.Store
	grace  time.Duration
}

// openShared opens the claims, node state and registry buckets.
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
	octx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cs, err := claims.New(octx, js, claims.Config{Owner: p.cfg.Name, Lease: lease, Replicas: p.cfg.HA.Replicas})
	if err != nil {
		return fmt.Errorf("ha: %w", err)
	}
	ns, err := nodestate.New(octx, js, "", p.cfg.HA.Replicas)
	if err != nil {
		return fmt.Errorf("ha: %w", err)
	}
	reg, err := openKVRegistry(octx, js, p.cfg.HA.Replicas)
	if err != nil {
		return fmt.Errorf("ha: %w", err)
	}
	p.mu.Lock()
	p.shared = &shared{mode: mode, claims: cs, nodes: ns, grace: p.cfg.Grace.D()}
	p.reg = reg
	p.mu.Unlock()
	if err := p.loadDenied(); err != nil {
		return fmt.Errorf("ha: identity registry: %w", err)
	}
	p.log.WithFields(logrus.Fields{"mode": mode, "lease": lease.String(), "replicas": max(1, p.cfg.HA.Replicas)}).Info("sharing state through JetStream")
	return nil
}

// errElsewhere: the node is another provisioner's (claimed, or finished
// within the grace period).
var errElsewhere = errors.New("node handled by another provisioner")

// claimNode claims identity for this provisioner. It returns a context
// that ends when the claim is lost (the attempt must stop) and a release
// function; errElsewhere when another provisioner has the node.
func (p *Provisioner) claimNode(ctx context.Context, identity string) (context.Context, func(), error) {
	sh := p.shared
	c, err := sh.claims.Claim(ctx, identity)
	if errors.Is(err, claims.ErrClaimed) {
		return nil, nil, errElsewhere
	}
	if err != nil {
		return nil, nil, err
	}
	rec, err := sh.nodes.Get(ctx, identity)
	switch {
	case errors.Is(err, nodestate.ErrNotFound):
		rec = &nodestate.Record{Identity: identity}
	case err != nil:
		_ = c.Release(context.WithoutCancel(ctx))
		return nil, nil, err
	case rec.State == string(StateProvisioned) && time.Since(rec.ProvisionedAt) < sh.grace,
		rec.State == string(StateProduction):
		_ = c.Release(context.WithoutCancel(ctx))
		return nil, nil, errElsewhere
	}
	hctx, cancel := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c.Hold(hctx, func(err error) {
			p.log.WithField("identity", identity).WithError(err).Warn("claim lost; stopping this node's attempt")
			cancel(err)
		})
	}()
	rec.State, rec.Stage, rec.ClaimedBy = string(StateInProgress), string(StageInventory), sh.claims.Owner()
	rec.Attempts++
	if rec.DiscoveredAt.IsZero() {
		rec.DiscoveredAt = time.Now().UTC()
	}
	if err := sh.nodes.Put(ctx, *rec); err != nil {
		p.log.WithError(err).WithField("identity", identity).Warn("could not record node state")
	}
	release := func() {
		cancel(nil)
		wg.Wait()
		rctx, rcancel := context.WithTimeout(context.Background(), sh.claims.Lease())
		defer rcancel()
		if err := c.Release(rctx); err != nil {
			p.log.WithError(err).WithField("identity", identity).Debug("release claim")
		}
	}
	return hctx, release, nil
}

// recordShared writes the node's outcome to the shared node state; called
// while this provisioner still holds the claim.
func (p *Provisioner) recordShared(identity string) {
	sh := p.shared
	p.mu.Lock()
	n := p.nodes[identity]
	var st NodeStatus
	if n != nil {
		st = n.NodeStatus
	}
	p.mu.Unlock()
	if n == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), sh.claims.Lease())
	defer cancel()
	rec, err := sh.nodes.Get(ctx, identity)
	if err != nil {
		rec = &nodestate.Record{Identity: identity, Attempts: 1}
	}
	rec.State, rec.Stage, rec.LastError, rec.ClaimedBy = string(st.State), string(st.Stage), st.LastError, ""
	if st.State == StateProvisioned || st.State == StateProduction {
		rec.ProvisionedAt = st.ProvisionedAt.UTC()
		rec.ProvisionedBy = sh.claims.Owner()
		if r, ok, _ := p.reg.Get(identity); ok {
			rec.Serial = r.Serial
		}
	}
	if err := sh.nodes.Put(ctx, *rec); err != nil {
		p.log.WithError(err).WithField("identity", identity).Warn("could not record node state")
	}
}

// markElsewhere parks a node another provisioner has: looked at again after
// a lease (if that provisioner dies, its claim lapses and the node, still
// announcing itself, comes back here).
func (p *Provisioner) markElsewhere(identity string) {
	now := time.Now()
	p.mu.Lock()
	if n := p.nodes[identity]; n != nil && n.State == StateInProgress {
		n.State = StateElsewhere
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
