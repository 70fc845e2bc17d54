package provisioner

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// rpcBackoffBase is the first retry delay; it doubles per attempt, jittered.
const rpcBackoffBase = 200 * time.Millisecond

// maxStderrLog bounds the helper stderr that goes into a log entry.
const maxStderrLog = 2048

// stageError is a pipeline failure at a stage.
type stageError struct {
	stage Stage
	err   error
}

func (e *stageError) Error() string { return fmt.Sprintf("%s: %v", e.stage, e.err) }
func (e *stageError) Unwrap() error { return e.err }

func failAt(stage Stage, err error) error { return &stageError{stage: stage, err: err} }

// attempt is one run of the pipeline for one node.
type attempt struct {
	p       *Provisioner
	id      string
	log     *logrus.Entry
	started time.Time
	stage   Stage
	retryAt time.Duration // for deferrals
	outcome Outcome
	// approval is the operator approval this attempt consumed, if any.
	approval *approval
	// hold is the node's claim (ha modes; nil in single mode).
	hold *heldClaim
	// configured is set once the node acknowledged configure.
	configured bool
	keyFP      string // fingerprint of the node's key
	serial     string // serial of the certificate sent
	tokenID    string // jti of the node's provisioning token
	life       string // the node's provisioning-mode life ID (its inventory's)
}

// process runs one node through the pipeline and records the result.
func (p *Provisioner) process(ctx context.Context, it queueItem) {
	now := time.Now()
	p.mu.Lock()
	n := p.nodes[it.identity]
	if n == nil || n.State != StateQueued {
		// Arrived in production (or similar) while queued.
		p.mu.Unlock()
		return
	}
	p.setState(n, StateInProgress)
	n.Stage = StageInventory
	n.Attempts++
	n.Updated = now
	p.mu.Unlock()

	p.m.queueWait.Observe(now.Sub(it.queuedAt).Seconds())
	p.m.busy.Inc()
	defer p.m.busy.Dec()

	a := &attempt{p: p, id: it.identity, started: now, stage: StageInventory,
		log: p.log.WithField("identity", it.identity)}
	if p.shared != nil {
		// Several provisioners: work on the node only under its claim.
		h, err := p.claimNode(ctx, it.identity, it.life)
		var ip *inProduction
		switch {
		case errors.As(err, &ip):
			p.m.claimConflicts.Inc()
			p.backToProduction(it.identity, ip)
			return
		case errors.Is(err, errElsewhere):
			p.m.claimConflicts.Inc()
			p.markElsewhere(it.identity)
			return
		case err != nil:
			p.m.errors.WithLabelValues(string(StageClaim)).Inc()
			p.log.WithError(err).WithField("identity", it.identity).Warn("could not claim node")
			p.markElsewhere(it.identity)
			return
		}
		defer p.releaseClaim(it.identity, h)
		a.hold = h
		ctx = h.ctx
	}
	err := a.run(ctx)
	abandoned := ctx.Err() != nil
	if a.hold != nil {
		err = p.recordShared(a, err, abandoned)
	}
	p.finish(a, err, abandoned)
}

// setStage records the stage a node is in.
func (a *attempt) setStage(s Stage) {
	a.stage = s
	a.p.mu.Lock()
	if n := a.p.nodes[a.id]; n != nil {
		n.Stage = s
		n.Updated = time.Now()
	}
	a.p.mu.Unlock()
}

func (a *attempt) run(ctx context.Context) error {
	p := a.p
	rep, err := p.rpc(ctx, a.id, protocol.AgentRPCUtil, protocol.ActionInventory, StageInventory, nil)
	if err != nil {
		return failAt(StageInventory, err)
	}
	inv, err := decodeInventory(rep.Body)
	if err != nil {
		return failAt(StageInventory, err)
	}
	a.life = inv.Life
	claims, tokenID, err := p.checkToken(a.id, inv.ProvisioningToken)
	if err != nil {
		return failAt(StageInventory, err)
	}
	a.tokenID = tokenID
	// The token is a bearer secret: the helper gets its verified claims,
	// never the token itself.
	inv.ProvisioningToken = ""
	invJSON, err := json.Marshal(inv)
	if err != nil {
		return failAt(StageInventory, fmt.Errorf("inventory: %w", err))
	}
	inventory := string(invJSON)

	var csrInfo *helper.CSRInfo
	var pub crypto.PublicKey
	if p.cfg.Features.PKI {
		a.setStage(StageGenCSR)
		g, err := p.nodeCSR(ctx, a)
		if err != nil {
			return failAt(StageGenCSR, err)
		}
		if pub, err = p.checkNodeCSR(a, g); err != nil {
			return failAt(StageGenCSR, err)
		}
		csrInfo = &helper.CSRInfo{CSR: g.CSR, PublicKey: g.PublicKey, SSLDir: g.SSLDir}
	}

	a.setStage(StageHelper)
	req := &helper.Request{
		Identity:  a.id,
		CSR:       csrInfo,
		Inventory: inventory,
		JWT:       claims,
		RequestID: nuid.Next(),
		Site:      p.cfg.Site,
	}
	hrep, err := p.runHelper(ctx, a, req)
	if err != nil {
		return failAt(StageHelper, err)
	}

	a.setStage(StageValidate)
	if err := p.validateReply(a, req, hrep, pub); err != nil {
		return failAt(StageValidate, err)
	}

	switch {
	case hrep.Defer:
		a.outcome = OutcomeDeferred
		a.retryAt = p.cfg.DeferBackoff.D()
		if hrep.RetryAfter > 0 {
			a.retryAt = time.Duration(hrep.RetryAfter) * time.Second
		}
		a.log.WithFields(logrus.Fields{"msg": hrep.Msg, "retry_after": a.retryAt.String()}).Info("helper deferred node")
		p.tellDefer(ctx, a, hrep.Msg)
		return nil
	case hrep.Shutdown:
		a.setStage(StageShutdown)
		if _, err := p.rpc(ctx, a.id, protocol.AgentProvision, protocol.ActionShutdown, StageShutdown, protocol.ShutdownRequest{Reason: hrep.Msg}); err != nil {
			return failAt(StageShutdown, err)
		}
		a.outcome = OutcomeShutdown
		a.log.WithField("msg", hrep.Msg).Info("node told to shut down")
		return nil
	}

	if err := p.stillClear(a); err != nil {
		return failAt(StageValidate, err)
	}
	a.setStage(StageConfigure)
	if a.hold != nil {
		if err := p.confirmClaim(ctx, a); err != nil {
			return failAt(StageConfigure, err)
		}
	}
	creq := protocol.ConfigureRequest{
		Configuration:  hrep.Configuration,
		Certificate:    hrep.Certificate,
		CA:             hrep.CA,
		SSLDir:         hrep.SSLDir,
		ActionPolicies: hrep.ActionPolicies,
		OPAPolicies:    hrep.OPAPolicies,
	}
	if _, err := p.rpc(ctx, a.id, protocol.AgentProvision, protocol.ActionConfigure, StageConfigure, creq); err != nil {
		// A node killed right after writing its files loses the reply;
		// back in production with the new certificate, its arrival says
		// that configure took.
		if p.arrivedWith(a.id, a.serial).IsZero() {
			return failAt(StageConfigure, err)
		}
		a.log.WithError(err).Info("configure not acknowledged, but the node arrived in production with its new certificate")
	}
	// The node's disk now holds its key and certificate: record them at
	// once, so that whatever happens before the restart is confirmed (this
	// provisioner or the node dies), the next attempt finds the key the
	// node really has and does not hold it as changed.
	a.configured = true
	if err := p.recordConfigured(ctx, a); err != nil {
		return failAt(StageConfigure, err)
	}
	if !p.arrivedWith(a.id, a.serial).IsZero() {
		a.outcome = OutcomeProvisioned // in production already
		return nil
	}
	a.setStage(StageRestart)
	rreq := protocol.RestartRequest{SplayMillis: int(p.cfg.RestartSplay.D() / time.Millisecond)}
	if _, err := p.rpc(ctx, a.id, protocol.AgentProvision, protocol.ActionRestart, StageRestart, rreq); err != nil {
		// A node that restarted by itself (killed, rebooted) after
		// configure runs in production already and no longer answers on
		// the provisioning side: its arrival with the new certificate is
		// the confirmation.
		if p.arrivedWith(a.id, a.serial).IsZero() {
			return failAt(StageRestart, err)
		}
		a.log.WithError(err).Info("restart not confirmed, but the node arrived in production with its new certificate")
	}
	a.outcome = OutcomeProvisioned
	return nil
}

// decodeInventory decodes the body of a node's inventory reply.
func decodeInventory(body []byte) (*protocol.Inventory, error) {
	var inv protocol.Inventory
	if err := protocol.DecodeLenient(body, protocol.MaxMessageSize, &inv); err != nil {
		return nil, fmt.Errorf("inventory body: %w: %v", ErrBadReply, err)
	}
	if !protocol.ValidLife(inv.Life) {
		return nil, fmt.Errorf("inventory body: life: %w", ErrBadReply)
	}
	return &inv, nil
}

// checkCSR checks a gencsr reply: the CSR's signature, its CN and the public
// key it carries against the reply's public_key. It returns the CSR and the
// key.
func checkCSR(id string, g *protocol.GenCSRReply) (*x509.CertificateRequest, crypto.PublicKey, error) {
	csr, err := pki.ParseCSR([]byte(g.CSR))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrBadCSR, err)
	}
	if csr.Subject.CommonName != id {
		return nil, nil, fmt.Errorf("%w: CN %q is not the identity", ErrBadCSR, clip(csr.Subject.CommonName))
	}
	block, rest := pem.Decode([]byte(g.PublicKey))
	if block == nil || block.Type != "PUBLIC KEY" || len(bytes.TrimSpace(rest)) > 0 {
		return nil, nil, fmt.Errorf("%w: public_key is not one PEM public key", ErrBadCSR)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: public_key: %v", ErrBadCSR, err)
	}
	if !pki.SamePublicKey(csr.PublicKey, pub) {
		return nil, nil, fmt.Errorf("%w: public_key does not match the CSR", ErrBadCSR)
	}
	return csr, pub, nil
}

// runHelper runs the helper under the helper semaphore with HelperTimeout.
func (p *Provisioner) runHelper(ctx context.Context, a *attempt, req *helper.Request) (*helper.Reply, error) {
	select {
	case p.helperSem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-p.helperSem }()
	hctx, cancel := context.WithTimeout(ctx, p.cfg.HelperTimeout.D())
	defer cancel()
	start := time.Now()
	rep, err := p.helper.Provision(hctx, req)
	dur := time.Since(start).Seconds()
	if err == nil && rep == nil {
		err = fmt.Errorf("%w: helper returned no reply", ErrHelperRejected)
	}
	if err != nil {
		p.m.helperDur.WithLabelValues(helperError).Observe(dur)
		fields := logrus.Fields{"request_id": req.RequestID}
		if se := helper.Stderr(err); se != "" {
			if len(se) > maxStderrLog {
				se = se[:maxStderrLog] + "…"
			}
			fields["stderr"] = se
		}
		a.log.WithFields(fields).WithError(err).Warn("helper failed")
		return nil, err
	}
	outcome := helperConfigure
	switch {
	case rep.Defer:
		outcome = helperDefer
	case rep.Shutdown:
		outcome = helperShutdown
	}
	p.m.helperDur.WithLabelValues(outcome).Observe(dur)
	return rep, nil
}

// validateReply applies the helper contract's rules (helper.ValidateReply)
// and, for a certificate, the provisioner's certificate checks
// (checkCertificate).
func (p *Provisioner) validateReply(a *attempt, req *helper.Request, rep *helper.Reply, pub crypto.PublicKey) error {
	now := time.Now()
	if err := helper.ValidateReply(req, rep, now); err != nil {
		return p.helperRejected(err)
	}
	if rep.Defer || rep.Shutdown || rep.Certificate == "" {
		return nil
	}
	return p.checkCertificate(a, req, rep, pub, now)
}

// finish records an attempt's result on the node, the metrics and the
// observer.
func (p *Provisioner) finish(a *attempt, err error, abandoned bool) {
	now := time.Now()
	stage := a.stage
	var se *stageError
	if errors.As(err, &se) {
		stage = se.stage
	}
	outcome := a.outcome
	// An attempt stopped because its claim lapsed (renewals too slow for
	// the lease): the node may be another provisioner's now. Not a
	// shutdown, and nothing is recorded in the shared state.
	lost := err != nil && a.hold != nil && a.hold.lost()
	p.mu.Lock()
	n := p.nodes[a.id]
	if n == nil {
		n = p.addNode(a.id)
	}
	n.Stage = stage
	n.Updated = now
	n.HelperStderr = ""
	held := p.applyHold(n, err, now)
	if se := helper.Stderr(err); se != "" {
		if len(se) > maxStderrLog {
			se = se[:maxStderrLog] + "…"
		}
		n.HelperStderr = se
	}
	switch {
	case held:
		outcome = OutcomeHeld
	case lost:
		p.setState(n, StateElsewhere)
		n.LastError = fmt.Sprintf("%s: %v", stage, context.Cause(a.hold.ctx))
		n.RetryAt = now.Add(p.shared.claims.Lease())
		outcome = OutcomeFailed
	case err != nil && abandoned:
		p.setState(n, StateAbandoned)
		n.LastError = ErrAbandoned.Error()
		n.RetryAt = time.Time{}
		outcome = OutcomeFailed
		err = fmt.Errorf("%s: %w", stage, ErrAbandoned)
	case err != nil:
		p.setState(n, StateFailed)
		n.LastError = err.Error()
		n.RetryAt = now.Add(p.cfg.DeferBackoff.D())
		outcome = OutcomeFailed
	case outcome == OutcomeDeferred:
		p.setState(n, StateDeferred)
		n.LastError = ""
		n.RetryAt = now.Add(a.retryAt)
	case outcome == OutcomeShutdown:
		p.setState(n, StateShutdown)
		n.LastError = ""
		n.RetryAt = now.Add(p.cfg.Grace.D())
	case outcome == OutcomeProvisioned:
		if n.State != StateProduction {
			p.setState(n, StateProvisioned)
		}
		if a.serial != "" && n.arrivedSerial == a.serial {
			p.setState(n, StateProduction)
		}
		n.LastError = ""
		n.ProvisionedAt = now
		n.RetryAt = now.Add(p.cfg.Grace.D())
	}
	p.mu.Unlock()

	switch {
	case held:
		a.log.WithError(err).Warn("node held for an operator")
	case lost:
		// Hold's callback logged the loss.
		p.m.claimsLost.WithLabelValues(string(stage)).Inc()
	case err != nil && abandoned:
		a.log.WithField("stage", string(stage)).Warn("node abandoned at shutdown")
	case err != nil:
		p.m.errors.WithLabelValues(string(stage)).Inc()
		a.log.WithField("stage", string(stage)).WithError(err).Warn("node provisioning failed")
	case outcome == OutcomeDeferred:
		p.m.deferred.Inc()
	case outcome == OutcomeShutdown:
		p.m.shutdown.Inc()
	case outcome == OutcomeProvisioned:
		p.m.provisioned.Inc()
		p.m.nodeDuration.Observe(now.Sub(a.started).Seconds())
		a.log.WithField("seconds", now.Sub(a.started).Seconds()).Info("node provisioned")
	}
	if p.observer != nil {
		p.observer.NodeDone(a.id, outcome, stage, err)
	}
}

// rpc sends one request to a node and returns its ok reply. Timeouts, no
// responders and "internal" replies are retried RPCRetries times with
// jittered exponential backoff; other non-ok replies are the node's answer
// and are returned at once as a *protocol.ReplyError.
func (p *Provisioner) rpc(ctx context.Context, target, agent, action string, stage Stage, body any) (*protocol.Reply, error) {
	nc := p.conn()
	if nc == nil {
		return nil, ErrNotRunning
	}
	var raw json.RawMessage
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", agent, action, err)
		}
		raw = b
	}
	subject := protocol.NodeSubject(protocol.ProvisioningCollective, target)
	var lastErr error
	for attempt := 0; attempt <= p.cfg.RPCRetries; attempt++ {
		if attempt > 0 {
			p.m.retries.WithLabelValues(string(stage)).Inc()
			back := rpcBackoffBase << (attempt - 1)
			back = back/2 + time.Duration(rand.Int64N(int64(back)))
			t := time.NewTimer(back)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, fmt.Errorf("%s %s: %w (last error: %v)", agent, action, ctx.Err(), lastErr)
			case <-t.C:
			}
		}
		rep, retry, err := p.rpcOnce(ctx, nc, subject, target, agent, action, raw)
		if err == nil {
			return rep, nil
		}
		lastErr = err
		if !retry || ctx.Err() != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("%s %s: gave up after %d attempts: %w", agent, action, p.cfg.RPCRetries+1, lastErr)
}

func (p *Provisioner) rpcOnce(ctx context.Context, nc *nats.Conn, subject, target, agent, action string, body json.RawMessage) (*protocol.Reply, bool, error) {
	req := protocol.Request{
		Protocol: protocol.RequestProtocol,
		ID:       nuid.Next(),
		Sender:   p.cfg.Name,
		Target:   target,
		Agent:    agent,
		Action:   action,
		Time:     time.Now().UTC(),
		TTL:      p.ttl(),
		Body:     body,
	}
	if err := req.Sign(p.signer); err != nil {
		return nil, false, fmt.Errorf("%s %s: %w", agent, action, err)
	}
	data, err := protocol.Marshal(req)
	if err != nil {
		return nil, false, fmt.Errorf("%s %s: %w", agent, action, err)
	}
	rctx, cancel := context.WithTimeout(ctx, p.cfg.RPCTimeout.D())
	defer cancel()
	start := time.Now()
	msg, err := nc.RequestWithContext(rctx, subject, data)
	p.m.rpcDuration.WithLabelValues(action).Observe(time.Since(start).Seconds())
	if err != nil {
		retry := errors.Is(err, nats.ErrNoResponders) || errors.Is(err, nats.ErrTimeout) ||
			(errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil) || errors.Is(err, nats.ErrConnectionClosed) ||
			errors.Is(err, nats.ErrDisconnected) || errors.Is(err, nats.ErrConnectionReconnecting)
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("no reply within %s: %w", p.cfg.RPCTimeout, nats.ErrTimeout)
		}
		return nil, retry, fmt.Errorf("%s %s: %w", agent, action, err)
	}
	rep, err := protocol.DecodeReply(msg.Data)
	if err != nil {
		p.invalid(sourceReply, err)
		return nil, false, fmt.Errorf("%s %s: %w: %w", agent, action, ErrBadReply, err)
	}
	if rep.Sender != target {
		p.invalid(sourceReply, ErrWrongSender)
		return nil, false, fmt.Errorf("%s %s: %w: %q", agent, action, ErrWrongSender, rep.Sender)
	}
	if rep.ID != req.ID {
		p.invalid(sourceReply, ErrBadReply)
		return nil, false, fmt.Errorf("%s %s: %w: reply to request %q", agent, action, ErrBadReply, rep.ID)
	}
	off, known := clockOffset(start, time.Now(), rep.Time)
	if known {
		p.m.clockOffset.Observe(math.Abs(off.Seconds()))
	}
	if err := rep.Err(); err != nil {
		if rep.Code == protocol.CodeExpired && known && off.Abs() >= time.Second {
			// The usual cause: a node whose clock is wrong (no NTP yet).
			return nil, false, fmt.Errorf("%s %s: %w (%s)", agent, action, err, describeOffset(off))
		}
		return nil, rep.Code == protocol.CodeInternal, fmt.Errorf("%s %s: %w", agent, action, err)
	}
	return rep, false, nil
}

// clockOffset estimates how far ahead of this provisioner's clock a node's
// is, from a request sent at sent, its reply received at received, and the
// time the node put in the reply (its clock, between the two): accurate to
// half the round trip. known is false when the reply has no time.
func clockOffset(sent, received, nodeTime time.Time) (off time.Duration, known bool) {
	if nodeTime.IsZero() {
		return 0, false
	}
	return nodeTime.Sub(sent.Add(received.Sub(sent) / 2)), true
}

// describeOffset says in words how a node's clock stands to this
// provisioner's.
func describeOffset(off time.Duration) string {
	if off < 0 {
		return fmt.Sprintf("the node's clock is %s behind this provisioner's", (-off).Round(time.Second))
	}
	return fmt.Sprintf("the node's clock is %s ahead of this provisioner's", off.Round(time.Second))
}

// tellDefer tells a deferred node when the provisioner will take it again,
// so it stops announcing itself until then (backpressure for storms). Best
// effort: one attempt, a failure is only logged.
func (p *Provisioner) tellDefer(ctx context.Context, a *attempt, reason string) {
	nc := p.conn()
	secs := int((a.retryAt + time.Second - 1) / time.Second)
	if nc == nil || secs < 1 {
		return
	}
	secs = min(secs, protocol.MaxRetryAfter)
	if len(reason) > 256 {
		reason = reason[:256]
	}
	body, err := json.Marshal(protocol.DeferRequest{RetryAfter: secs, Reason: reason})
	if err != nil {
		return
	}
	subject := protocol.NodeSubject(protocol.ProvisioningCollective, a.id)
	if _, _, err := p.rpcOnce(ctx, nc, subject, a.id, protocol.AgentProvision, protocol.ActionDefer, body); err != nil {
		a.log.WithError(err).Debug("could not tell the node it was deferred")
	}
}
