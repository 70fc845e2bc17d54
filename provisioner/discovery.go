package provisioner

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/protocol"
)

// productionPrefix is where the provisioning account sees the production
// account's lifecycle events (the broker's import).
const productionPrefix = "production."

// invalidLogEvery is the shortest interval between two debug logs about
// malformed messages from one source.
const invalidLogEvery = 5 * time.Second

// messageLoop handles metadata, startup and production events until ctx is
// done.
func (p *Provisioner) messageLoop(ctx context.Context, msgs <-chan *nats.Msg) {
	report := time.NewTicker(p.intake.reportEvery)
	defer report.Stop()
	for {
		select {
		case <-ctx.Done():
			p.intake.report(p.log, p.cfg.QueueSize)
			return
		case m := <-msgs:
			p.handleMessage(m)
		case <-report.C:
			p.intake.report(p.log, p.cfg.QueueSize)
		}
	}
}

func (p *Provisioner) handleMessage(m *nats.Msg) {
	switch {
	case m.Subject == protocol.AdvisoryDuplicateIdentity:
		d, err := protocol.DecodeDuplicateIdentity(m.Data)
		if err != nil {
			p.invalid(sourceAdvisory, err)
			return
		}
		// Two machines claim one identity: hold it for an operator rather
		// than provision whichever answers first.
		if err := p.Hold(d.Identity, HoldDuplicateConnection); err != nil {
			p.log.WithError(err).WithField("identity", d.Identity).Warn("could not hold a duplicate identity")
		}
	case strings.HasPrefix(m.Subject, protocol.MetadataSubject+"."):
		// The subject names the sender (the broker lets a node publish
		// only as itself); metadata naming someone else is dropped.
		md, err := protocol.DecodeMetadataFrom(m.Subject, m.Data)
		if err != nil {
			p.invalid(sourceMetadata, err)
			return
		}
		p.m.discovered.WithLabelValues(sourceMetadata).Inc()
		// The life's start, so that a node reinstalled after it arrived
		// in production is taken again even when its startup event was
		// missed (it came while the last attempt was finishing, the
		// claim could not be written, the queue was full).
		p.offer(md.Identity, sourceMetadata, nodeLife{id: md.Life, started: md.Started})
	case strings.HasPrefix(m.Subject, productionPrefix):
		ev, err := protocol.DecodeEventFrom(strings.TrimPrefix(m.Subject, productionPrefix), m.Data)
		if err != nil || ev.Type != protocol.EventProvisioned {
			if err == nil {
				err = fmt.Errorf("event type %q", ev.Type)
			}
			p.invalid(sourceProduction, err)
			return
		}
		p.markProduction(ev)
	default:
		ev, err := protocol.DecodeEventFrom(m.Subject, m.Data)
		if err != nil || ev.Type != protocol.EventStartup {
			if err == nil {
				err = fmt.Errorf("event type %q", ev.Type)
			}
			p.invalid(sourceStartup, err)
			return
		}
		p.m.discovered.WithLabelValues(sourceStartup).Inc()
		p.offer(ev.Identity, sourceStartup, nodeLife{id: ev.Life, started: ev.Time})
	}
}

// invalid counts a malformed message and logs it at debug, at most once per
// invalidLogEvery per source.
func (p *Provisioner) invalid(source string, err error) {
	p.m.invalid.WithLabelValues(source).Inc()
	now := time.Now()
	p.mu.Lock()
	t := p.invalidAt[source]
	if now.Sub(t.last) < invalidLogEvery {
		t.suppressed++
		p.invalidAt[source] = t
		p.mu.Unlock()
		return
	}
	suppressed := t.suppressed
	p.invalidAt[source] = logThrottle{last: now}
	p.mu.Unlock()
	p.log.WithFields(logrus.Fields{"source": source, "suppressed": suppressed}).WithError(err).Debug("dropped malformed message")
}

// markProduction records a node's arrival on the production side, with the
// certificate serial its event names (an attempt in progress whose restart
// cannot be confirmed looks at it).
func (p *Provisioner) markProduction(ev *protocol.Event) {
	id := ev.Identity
	now := time.Now()
	p.mu.Lock()
	n := p.nodes[id]
	if n == nil {
		n = p.addNode(id)
	}
	if ev.ID == "" || ev.ID != n.arrivalID {
		// One arrival per ID: a node publishes its event again after a
		// reconnection and a few times more (it may have been lost).
		n.arrivalID = ev.ID
		p.m.arrivals.Inc()
	}
	if ev.Serial != "" {
		n.arrivedSerial, n.arrivedAt = ev.Serial, ev.Time
		if p.shared != nil {
			select {
			case p.seenArrivals <- ev:
			default: // the arrivals stream has it too
			}
		}
	}
	switch n.State {
	case StateInProgress, StateQueued, StateHeld, StateDenied:
	default:
		p.setState(n, StateProduction)
		n.RetryAt = time.Time{}
	}
	n.Updated = now
	// The node's clock, as the start times it is compared with: a skew
	// between node and provisioner neither hides a new life nor makes
	// one of an old announcement.
	n.productionSince = ev.Time
	if n.productionSince.IsZero() {
		n.productionSince = now
	}
	p.mu.Unlock()
	p.log.WithField("identity", id).Debug("node arrived in production")
}

// offer queues a node unless it is queued, in progress, in production,
// held, denied, or waiting (deferred, failed, grace, or another
// provisioner's until its claim could have lapsed). l is the
// provisioning-mode life the announcement names: a node in production that
// began a new life since (nodeLife.newer) was reprovisioned and is taken
// again.
// It reports whether the node was queued.
func (p *Provisioner) offer(id, source string, l nodeLife) bool {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.nodes[id]
	if n == nil {
		n = p.addNode(id)
	}
	switch n.State {
	case StateQueued, StateInProgress, StateHeld, StateDenied:
		return false
	case StateProduction:
		// Only a new life is taken: an announcement may be the old
		// life's last one. The arrival's time, not Updated, which the
		// attempt's result sets when it comes after the arrival (a late
		// restart reply). A life ID this provisioner cannot compare
		// (another configured the node) goes to the claim, which
		// compares it with the shared record's.
		if !(l.id != "" && n.Life == "" && p.shared != nil) && !l.newer(n.Life, n.productionSince) {
			return false
		}
	case StateDeferred, StateFailed, StateProvisioned, StateShutdown, StateElsewhere:
		if now.Before(n.RetryAt) {
			return false
		}
	}
	select {
	case p.queue <- queueItem{identity: id, queuedAt: now, life: l}:
	default:
		p.m.shed.Inc()
		if n.State == "" {
			p.dropNode(id)
		}
		return false
	}
	p.setState(n, StateQueued)
	n.Source = source
	n.Updated = now
	n.queuedAt = now
	return true
}

// discoveryLoop runs broadcast discovery at once and every Interval.
func (p *Provisioner) discoveryLoop(ctx context.Context) {
	t := time.NewTicker(p.cfg.Interval.D())
	defer t.Stop()
	for {
		if _, err := p.Discover(ctx); err != nil && ctx.Err() == nil {
			p.log.WithError(err).Warn("broadcast discovery failed")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// discoveryWindow is how long Discover collects replies.
func (p *Provisioner) discoveryWindow() time.Duration {
	w := p.cfg.RPCTimeout.D() / 5
	return min(max(w, 200*time.Millisecond), 2*time.Second)
}

// Discover runs one broadcast discovery now: it publishes a discovery ping
// to every waiting node, collects replies for a short window, queues the
// nodes that answered and returns how many distinct nodes answered.
func (p *Provisioner) Discover(ctx context.Context) (int, error) {
	nc := p.conn()
	if nc == nil {
		return 0, ErrNotRunning
	}
	req := protocol.Request{
		Protocol: protocol.RequestProtocol,
		ID:       nuid.Next(),
		Sender:   p.cfg.Name,
		Agent:    protocol.AgentDiscovery,
		Action:   protocol.ActionPing,
		Time:     time.Now().UTC(),
		TTL:      p.ttl(),
	}
	data, err := protocol.Marshal(req)
	if err != nil {
		return 0, fmt.Errorf("discovery: %w", err)
	}
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return 0, fmt.Errorf("discovery subscribe: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	_ = sub.SetPendingLimits(-1, 64*1024*1024)
	if err := nc.PublishRequest(protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentDiscovery), inbox, data); err != nil {
		return 0, fmt.Errorf("discovery publish: %w", err)
	}
	wctx, cancel := context.WithTimeout(ctx, p.discoveryWindow())
	defer cancel()
	seen := map[string]bool{}
	for {
		m, err := sub.NextMsgWithContext(wctx)
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				break
			}
			if errors.Is(err, nats.ErrNoResponders) {
				// No node is listening: nothing to discover.
				break
			}
			return len(seen), fmt.Errorf("discovery: %w", err)
		}
		id, life, err := p.decodePing(m.Data, req.ID)
		if err != nil {
			p.invalid(sourceDiscovery, err)
			continue
		}
		if id == "" || seen[id] {
			continue
		}
		seen[id] = true
		p.m.discovered.WithLabelValues(sourceDiscovery).Inc()
		p.offer(id, sourceDiscovery, nodeLife{id: life})
	}
	p.log.WithField("nodes", len(seen)).Debug("broadcast discovery done")
	return len(seen), ctx.Err()
}

// decodePing returns the identity and life ID of a waiting node's discovery
// reply; no identity for a node that is not in provisioning mode.
func (p *Provisioner) decodePing(data []byte, reqID string) (id, life string, err error) {
	rep, err := protocol.DecodeReply(data)
	if err != nil {
		return "", "", err
	}
	if rep.ID != reqID {
		return "", "", fmt.Errorf("reply to request %q: %w", rep.ID, ErrBadReply)
	}
	if err := rep.Err(); err != nil {
		return "", "", err
	}
	var body protocol.PingReply
	if err := protocol.DecodeLenient(rep.Body, protocol.MaxMessageSize, &body); err != nil {
		return "", "", fmt.Errorf("ping body: %w", err)
	}
	if body.Identity != rep.Sender {
		return "", "", fmt.Errorf("ping body names %q: %w", body.Identity, ErrWrongSender)
	}
	if !protocol.ValidLife(body.Life) {
		return "", "", fmt.Errorf("ping body: life: %w", ErrBadReply)
	}
	if body.Mode != "" && body.Mode != protocol.ProvisioningCollective {
		return "", "", nil
	}
	return rep.Sender, body.Life, nil
}

// ttl is the request TTL in seconds: RPCTimeout rounded up, at least 5.
func (p *Provisioner) ttl() int {
	d := p.cfg.RPCTimeout.D()
	s := int((d + time.Second - 1) / time.Second)
	return max(s, 5)
}

func sortNodes(ns []NodeStatus) {
	sort.Slice(ns, func(i, j int) bool { return ns[i].Identity < ns[j].Identity })
}
