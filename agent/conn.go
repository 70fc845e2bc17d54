package agent

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/patience"
	"github.com/muster-io/muster/internal/pki"
)

// ErrPinMismatch is the TLS verification error when no certificate of the
// broker's chain matches the configured CA pin.
var ErrPinMismatch = errors.New("no certificate in the broker's chain matches the CA pin")

// provisioningTLS builds the client TLS configuration for the provisioning
// brokers: server authentication only, no client certificate.
func (a *Agent) provisioningTLS() (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if a.prov.InsecureSkipVerify {
		tc.InsecureSkipVerify = true
		return tc, nil
	}
	var roots *x509.CertPool
	if len(a.caPEM) > 0 {
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(a.caPEM) {
			return nil, errors.New("provisioning ca: no certificate")
		}
		tc.RootCAs = roots
	}
	if a.caPin == "" {
		if roots == nil {
			return nil, errors.New("provisioning broker verification: no CA and no CA pin (give one, or --insecure-skip-tls-verify)")
		}
		return tc, nil
	}
	// With a pin, the pinned certificate anchors verification. When a CA is
	// also given the standard verification runs first and the pin is
	// checked on top; without one, standard verification is replaced.
	tc.InsecureSkipVerify = roots == nil
	pin := a.caPin
	ipHosts := brokerIPs(a.prov.Brokers)
	tc.VerifyConnection = func(cs tls.ConnectionState) error {
		err := verifyPinned(cs, pin, ipHosts)
		if err != nil {
			// Logged on the first failure and then every 100th, so a
			// misconfigured pin is visible without flooding the log.
			if n := a.tlsRefused.Add(1); n%100 == 1 {
				a.log.WithError(err).WithField("failures", n).Warn("provisioning broker failed the CA pin check")
			}
		}
		return err
	}
	return tc, nil
}

// brokerIPs returns the IP address hosts of the broker list.
func brokerIPs(brokers []string) []string {
	var out []string
	for _, b := range brokers {
		for _, part := range strings.Split(b, ",") {
			u, err := brokerURL(part)
			if err != nil {
				continue
			}
			if pu, err := url.Parse(u); err == nil && net.ParseIP(pu.Hostname()) != nil {
				out = append(out, pu.Hostname())
			}
		}
	}
	return out
}

// verifyPinned finds the certificate whose public key matches pin among the
// certificates the server sent (and the verified chains) and verifies the
// leaf against it, including the host name. A broker addressed by IP sends
// no server name (TLS has no SNI for addresses), so its certificate must
// then name one of the configured broker addresses, ipHosts.
func verifyPinned(cs tls.ConnectionState, pin string, ipHosts []string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("broker sent no certificate")
	}
	var anchor *x509.Certificate
	candidates := append([]*x509.Certificate{}, cs.PeerCertificates...)
	for _, ch := range cs.VerifiedChains {
		candidates = append(candidates, ch...)
	}
	for _, c := range candidates {
		if pki.Pin(c) == pin {
			anchor = c
			break
		}
	}
	if anchor == nil {
		return ErrPinMismatch
	}
	leaf := cs.PeerCertificates[0]
	roots := x509.NewCertPool()
	roots.AddCert(anchor)
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		DNSName:       cs.ServerName,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return fmt.Errorf("broker certificate does not verify against the pinned CA: %w", err)
	}
	if cs.ServerName != "" {
		return nil
	}
	for _, h := range ipHosts {
		if leaf.VerifyHostname(h) == nil {
			return nil
		}
	}
	return errors.New("broker certificate names none of the configured broker addresses")
}

// productionTLS builds the mutual TLS configuration from the paths in the
// configuration.
func productionTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load client certificate: %w", err)
	}
	// A helper may return the certificate with its CA: the broker holds
	// the root, so sending it only costs the broker a signature check.
	pair.Certificate = pki.WithoutTrustAnchors(pair.Certificate)
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("load ca: no certificate")
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{pair}, RootCAs: roots}, nil
}

// Broker failover defaults and limits.
const (
	// DefaultAliveInterval is how long a silent broker stays undetected.
	DefaultAliveInterval = 10 * time.Second
	// MinAliveInterval and MaxAliveInterval bound the alive interval.
	MinAliveInterval = 30 * time.Millisecond
	MaxAliveInterval = 10 * time.Minute
	// DefaultReconnectWait is the first wait between rounds of attempts.
	DefaultReconnectWait = 2 * time.Second
	// DefaultReconnectMaxWait caps the wait between rounds.
	DefaultReconnectMaxWait = 30 * time.Second
	// maxReconnectWait bounds reconnect waits read from the configuration.
	maxReconnectWait = 10 * time.Minute
	// alivePingsOut is how many pings may go unanswered: with a ping every
	// third of the alive interval, the third tick without an answer closes
	// the connection, at most one alive interval after the last answer.
	alivePingsOut = 2
	// connectAlives is how many alive intervals the first attempt of a
	// connection may take, within [minConnectTimeout, maxConnectTimeout]
	// (link.connectTimeout).
	connectAlives     = 3
	minConnectTimeout = 2 * time.Second
	maxConnectTimeout = time.Minute
)

// connectTimeout is how long the first attempt of a connection may take
// (TLS handshake, CONNECT, first PONG): three alive intervals, within
// [minConnectTimeout, maxConnectTimeout]; 30 s by default, where nats.go's
// default is 2 s. A broker slow to finish a handshake is busy, not dead,
// and it is busiest when a whole site powers on or a broker restarts under
// its nodes: every attempt given up is a handshake the broker starts again
// from the beginning. With 2 s a 10,000-node storm in one process lost
// 2,800 production handshakes; with one alive interval (10 s) an
// 8,900-node storm over TCP still authenticated 1.2 provisioning
// connections per node and refused 848 more as already connected; with
// three, none. Attempts that still run out of time get longer (patience).
// A dead broker is not waited for: the TCP connect keeps the alive
// interval (dialTimeout), and a closed or reset connection ends the attempt
// at once.
func (l link) connectTimeout() time.Duration {
	return min(max(connectAlives*l.alive, minConnectTimeout), maxConnectTimeout)
}

// dialTimeout is how long the TCP connect to a broker may take: the alive
// interval, within [minConnectTimeout, maxConnectTimeout].
func (l link) dialTimeout() time.Duration {
	return min(max(l.alive, minConnectTimeout), maxConnectTimeout)
}

// link are the failover settings of one connection: the order of the
// broker list, dead broker detection and the wait between rounds.
type link struct {
	shuffle bool
	alive   time.Duration
	wait    time.Duration
	maxWait time.Duration
}

// provisioningLink is the link of the provisioning connection, from the
// options.
func (a *Agent) provisioningLink() link {
	return link{shuffle: !a.prov.NoShuffle, alive: a.alive, wait: a.reconnWait, maxWait: a.reconnMax}
}

// productionLink is the link of the production connection: the options,
// overridden by the production configuration's keys. An invalid value is
// logged and ignored, so a bad key cannot keep a configured node off its
// brokers.
func (a *Agent) productionLink(cfg *config.Config) link {
	l := link{shuffle: true, alive: a.alive, wait: a.reconnWait, maxWait: a.reconnMax}
	warn := func(key, value, why string) {
		a.log.WithFields(logrus.Fields{"key": key, "value": value}).Warnf("ignoring configuration value: %s", why)
	}
	if v, ok := cfg.Get(config.KeyRandomizeHosts); ok {
		b, err := config.ParseBool(v)
		if err != nil {
			warn(config.KeyRandomizeHosts, v, "not a boolean")
		} else {
			l.shuffle = b
		}
	}
	dur := func(key string, lo, hi time.Duration, dst *time.Duration) {
		v, ok := cfg.Get(key)
		if !ok || v == "" {
			return
		}
		d, err := config.ParseDuration(v)
		if err != nil || d < lo || d > hi {
			warn(key, v, fmt.Sprintf("must be a duration between %s and %s", lo, hi))
			return
		}
		*dst = d
	}
	dur(config.KeyAliveInterval, MinAliveInterval, MaxAliveInterval, &l.alive)
	dur(config.KeyReconnectWait, time.Millisecond, maxReconnectWait, &l.wait)
	dur(config.KeyReconnectMaxWait, time.Millisecond, maxReconnectWait, &l.maxWait)
	l.maxWait = max(l.maxWait, l.wait)
	return l
}

// backoff is the wait before round n (1, 2, ...) of connection attempts:
// wait doubled per round up to maxWait, then jittered to between half and
// all of it, so a fleet that lost its broker does not come back in step.
func (l link) backoff(n int) time.Duration {
	d := l.wait
	for i := 1; i < n && d < l.maxWait; i++ {
		d *= 2
	}
	d = min(d, l.maxWait)
	if d <= 0 {
		return 0
	}
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// baseOptions are the NATS options every connection of the agent uses.
// connected receives a signal when the connection is established,
// reconnected each time it is established again after a loss. The
// client tries every broker of the list in turn (shuffled unless turned
// off, plus the brokers the cluster advertises) and waits l.backoff between
// rounds; it pings so that a broker that stops answering is given up within
// l.alive. p connects (over TCP, or in process when it has a provider)
// and times each attempt; nats.go's own timeout is set to its first
// timeout but is not the one that applies.
func (a *Agent) baseOptions(l link, p *patience.Patience, connected, reconnected, closed chan<- struct{}) []nats.Option {
	log := a.log
	opts := []nats.Option{
		nats.Name(a.id),
		nats.Timeout(l.connectTimeout()),
		nats.SetCustomDialer(p),
		nats.MaxReconnects(-1),
		nats.CustomReconnectDelay(l.backoff),
		nats.PingInterval(l.alive / (alivePingsOut + 1)),
		nats.MaxPingsOutstanding(alivePingsOut),
		nats.NoCallbacksAfterClientClose(),
		nats.ConnectHandler(func(*nats.Conn) { signal(connected) }),
		nats.ClosedHandler(func(*nats.Conn) { signal(closed) }),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.WithError(err).Warn("disconnected from broker")
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.WithField("broker", nc.ConnectedUrlRedacted()).Info("reconnected to broker")
			signal(reconnected)
		}),
		nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			log.WithError(err).Debug("connection attempt failed")
		}),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			log.WithError(err).Warn("broker connection error")
		}),
	}
	if !l.shuffle {
		opts = append(opts, nats.DontRandomize())
	}
	if p.InProcess() {
		opts = append(opts, nats.InProcessServer(p))
	}
	return opts
}

func signal(ch chan<- struct{}) {
	if ch == nil {
		return
	}
	select {
	case ch <- struct{}{}:
	default:
	}
}

// isRefusal reports whether a connection error means the broker refused this
// node (TLS or authorization failure), as opposed to a network problem.
func isRefusal(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) || errors.Is(err, nats.ErrAuthRevoked) || errors.Is(err, nats.ErrAccountAuthExpired) {
		return true
	}
	var cve *tls.CertificateVerificationError
	var alert tls.AlertError
	var rh tls.RecordHeaderError
	if errors.As(err, &cve) || errors.As(err, &alert) || errors.As(err, &rh) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false // a slow or busy broker, not a refusal
	}
	// A broker that rejects the client certificate closes the connection
	// once the TLS 1.3 handshake is complete on the client's side; its
	// alert is often lost to a reset, and nats.go reports the close as
	// ErrTLS ("connection closed by remote after TLS handshake"). ErrTLS
	// also wraps handshake timeouts, which are not refusals (above).
	if errors.Is(err, nats.ErrTLS) && closedByPeer(err) {
		return true
	}
	s := err.Error()
	return strings.Contains(s, "tls:") || strings.Contains(s, "x509:") || strings.Contains(strings.ToLower(s), "authorization")
}

// closedByPeer reports whether err says the other end closed the
// connection.
func closedByPeer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrClosedPipe) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
}

// jitter returns d scaled by a random factor in [1-f, 1+f].
func jitter(d time.Duration, f float64) time.Duration {
	if d <= 0 {
		return 0
	}
	return time.Duration(float64(d) * (1 - f + 2*f*rand.Float64()))
}

// urlList joins normalised broker URLs for nats.Connect.
func urlList(brokers []string) (string, error) {
	out := make([]string, 0, len(brokers))
	for _, b := range brokers {
		for _, part := range strings.Split(b, ",") {
			if strings.TrimSpace(part) == "" {
				continue
			}
			u, err := brokerURL(part)
			if err != nil {
				return "", fmt.Errorf("broker %q: %w", part, err)
			}
			out = append(out, u)
		}
	}
	if len(out) == 0 {
		return "", errors.New("no broker address")
	}
	return strings.Join(out, ","), nil
}
