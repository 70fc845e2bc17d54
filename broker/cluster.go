package broker

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
)

// Development cluster PKI names.
const (
	// DevClusterDir is the development cluster PKI's directory inside
	// <store_dir>/pki: its own CA, separate from the client CA, so that a
	// production node's certificate is never a route certificate.
	DevClusterDir = "cluster"
	// DevClusterCACN is the CN of the development cluster CA.
	DevClusterCACN = "Muster development cluster CA"
	// devRouteName is the route certificate's file name stem.
	devRouteName = "route"
)

// ErrClusterCA is wrapped when the cluster CA is also the client CA and no
// peer names restrict the routes.
var ErrClusterCA = errors.New("cluster CA is the client CA")

// Route handshake refusals when peer names are set.
var (
	errRouteUnverified   = errors.New("route peer presented no verified certificate")
	errRoutePeerUnlisted = errors.New("route certificate names no listed peer")
)

// routeTLSTimeout is the route TLS handshake timeout, in seconds.
const routeTLSTimeout = 5

// DevCluster is the development cluster PKI: a cluster CA and this
// broker's route certificate.
type DevCluster struct {
	// Dir is <store_dir>/pki/cluster.
	Dir string
	// CACert and CAKey are the cluster CA (ca.pem, ca-key.pem). Copy both
	// to the other brokers' <store_dir>/pki/cluster before their first start.
	CACert, CAKey string
	// RouteCert and RouteKey are this broker's route certificate (CN =
	// cluster.server_name; route.pem, route-key.pem).
	RouteCert, RouteKey string
}

// ensureDevCluster makes or reuses the development cluster CA in dir and
// issues the route certificate for serverName covering hosts.
func ensureDevCluster(dir, serverName string, hosts []string, now time.Time) (*DevCluster, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("dev cluster pki: %w", err)
	}
	authority, err := ca.LoadDir(dir, 0)
	if errors.Is(err, ca.ErrNotFound) {
		authority, err = ca.Init(dir, DevClusterCACN, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("dev cluster pki: %w", err)
	}
	d := &DevCluster{Dir: dir, CACert: filepath.Join(dir, ca.CertFile), CAKey: filepath.Join(dir, ca.KeyFile)}
	if d.RouteCert, d.RouteKey, err = ensureLeaf(authority, dir, devRouteName, serverName, hosts, now); err != nil {
		return nil, fmt.Errorf("dev cluster route certificate: %w", err)
	}
	return d, nil
}

// routeHosts are the names the development route certificate covers: the
// server names of the client listener plus the cluster listen and advertise
// hosts.
func routeHosts(clientHost string, cl ClusterConfig) []string {
	hosts := serverHosts(clientHost)
	for _, hp := range []string{cl.Listen, cl.Advertise} {
		if h, _, err := net.SplitHostPort(hp); err == nil && h != "" {
			if ip := net.ParseIP(h); ip != nil && ip.IsUnspecified() {
				continue
			}
			if !slices.Contains(hosts, h) {
				hosts = append(hosts, h)
			}
		}
	}
	return hosts
}

// setupCluster fills the cluster options of opts: routes, route TLS with
// mutual verification and the route authenticator. clientCAs are the client
// listener's CA certificates, compared with the cluster CA.
func (b *Broker) setupCluster(opts *server.Options, clientCAs []*x509.Certificate) error {
	cl := b.cfg.Cluster
	opts.ServerName = cl.ServerName
	opts.Cluster.Name = cl.Name
	opts.Cluster.Host, opts.Cluster.Port = splitHostPort(cl.Listen)
	opts.Cluster.Advertise = cl.Advertise
	opts.Cluster.NoAdvertise = cl.NoAdvertise
	for _, r := range cl.Routes {
		u, err := parseRoute(r)
		if err != nil {
			return fmt.Errorf("%w: cluster.routes %q: %w", ErrInvalidConfig, redactURL(r), err)
		}
		opts.Routes = append(opts.Routes, u)
	}
	if cl.InsecurePlaintextRoutes {
		return nil
	}
	files := cl.TLS
	if files.empty() {
		dev, err := ensureDevCluster(filepath.Join(b.cfg.StoreDir, DevPKIDir, DevClusterDir), cl.ServerName, routeHosts(b.host, cl), time.Now())
		if err != nil {
			return err
		}
		b.devCluster = dev
		files = TLSFiles{Cert: dev.RouteCert, Key: dev.RouteKey, CA: dev.CACert}
	}
	tc, cas, err := loadRouteTLS(files)
	if err != nil {
		return err
	}
	if len(cl.PeerNames) == 0 {
		for _, c := range cas {
			if slices.ContainsFunc(clientCAs, c.Equal) {
				return fmt.Errorf("%w: cluster.tls.ca %q: %w (tls.ca): every production node's certificate would be accepted as a route; use a dedicated cluster CA or set cluster.peer_names", ErrInvalidConfig, files.CA, ErrClusterCA)
			}
		}
	}
	auth := newRouteAuth(b.log, cl.PeerNames, tc.Certificates[0].Leaf)
	if len(cl.PeerNames) > 0 {
		// The names are checked in the handshake, in both directions: a
		// route this broker dials is refused when the peer's certificate
		// names no listed peer, as is one it accepts. Checking only
		// accepted routes (the authenticator below) would let a broker
		// whose list leaves a peer out still join it by dialing.
		tc.VerifyConnection = auth.verifyConnection
	}
	opts.Cluster.TLSConfig = tc
	opts.Cluster.TLSTimeout = routeTLSTimeout
	opts.CustomRouterAuthentication = auth
	b.clusterCAFile = files.CA
	return nil
}

// loadRouteTLS loads a route certificate and the cluster CA into a TLS
// configuration that both presents the certificate and requires and
// verifies the peer's, as server and as client.
func loadRouteTLS(f TLSFiles) (*tls.Config, []*x509.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: cluster.tls.cert %q / cluster.tls.key %q: %w", ErrInvalidConfig, f.Cert, f.Key, err)
	}
	cert.Certificate = pki.WithoutTrustAnchors(cert.Certificate)
	if cert.Leaf == nil { // routeAuth compares peers with it
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, nil, fmt.Errorf("%w: cluster.tls.cert %q: %w", ErrInvalidConfig, f.Cert, err)
		}
	}
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: cluster.tls.ca %q: %w", ErrInvalidConfig, f.CA, err)
	}
	cas, err := pki.ParseCertificates(caPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: cluster.tls.ca %q: %w", ErrInvalidConfig, f.CA, err)
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		pool.AddCert(c)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		RootCAs:      pool,
	}, cas, nil
}

// routeAuth authenticates incoming route connections: the peer must have
// presented a certificate that verified against the cluster CA and, when
// peer names are configured, that names one of them (CN or DNS SAN).
type routeAuth struct {
	log   *logrus.Entry
	names map[string]struct{}
	// self is this broker's own route certificate: the route to itself
	// (the routes list names every broker, this one included) is accepted
	// whatever peer_names says, and nats-server then drops it as a route
	// to self. Only the holder of this broker's key can present it.
	self *x509.Certificate
	// refusals limits the "route refused" log entries, per peer.
	refusals refusalLimits
}

func newRouteAuth(log *logrus.Entry, names []string, self *x509.Certificate) *routeAuth {
	r := &routeAuth{log: log, names: make(map[string]struct{}, len(names)), self: self}
	for _, n := range names {
		r.names[n] = struct{}{}
	}
	return r
}

// maxRefusalPeers bounds the peers refusalLimits limits one by one.
const maxRefusalPeers = 32

// refusalLimits allows a "route refused" entry once a second per peer, so
// that one refused peer (dialed every second) cannot hide another. Past
// maxRefusalPeers distinct peers the others share one limit.
type refusalLimits struct {
	mu    sync.Mutex
	peers map[string]*logLimit
	rest  logLimit
}

// allow is logLimit.allow for the peer's own limit.
func (l *refusalLimits) allow(peer string, now time.Time) (suppressed int, ok bool) {
	l.mu.Lock()
	lim := l.peers[peer]
	if lim == nil {
		lim = &l.rest
		if len(l.peers) < maxRefusalPeers {
			if l.peers == nil {
				l.peers = make(map[string]*logLimit)
			}
			lim = &logLimit{}
			l.peers[peer] = lim
		}
	}
	l.mu.Unlock()
	return lim.allow(now)
}

// Check implements server.Authentication for routes.
func (r *routeAuth) Check(c server.ClientAuthentication) bool {
	ok, reason := r.allowed(c)
	if ok {
		return true
	}
	remote, host := "", ""
	if addr := c.RemoteAddress(); addr != nil {
		remote = addr.String()
		host = remote
		if h, _, err := net.SplitHostPort(remote); err == nil {
			host = h // the port changes with every connection
		}
	}
	r.refused("remote:"+host, logrus.Fields{"remote": remote}, reason)
	return false
}

// verifyConnection is the route TLS configuration's VerifyConnection when
// peer names are set: the peer's verified certificate must name a listed
// peer, whichever side dialed.
func (r *routeAuth) verifyConnection(st tls.ConnectionState) error {
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		r.refused("server_name:"+st.ServerName, logrus.Fields{"server_name": st.ServerName}, "no verified route certificate")
		return errRouteUnverified
	}
	leaf := st.VerifiedChains[0][0]
	if !r.listed(leaf) {
		r.refused("peer_cn:"+leaf.Subject.CommonName, logrus.Fields{"peer_cn": leaf.Subject.CommonName}, "route certificate names no listed peer")
		return fmt.Errorf("%w: %q", errRoutePeerUnlisted, leaf.Subject.CommonName)
	}
	return nil
}

// refused logs a refused route, with what is known of the peer, at most
// once a second per peer (key); the line says how many were not logged.
func (r *routeAuth) refused(key string, peer logrus.Fields, reason string) {
	suppressed, logIt := r.refusals.allow(key, time.Now())
	if !logIt {
		return
	}
	r.log.WithFields(peer).WithFields(logrus.Fields{"reason": reason, "suppressed": suppressed}).Warn("route refused")
}

// listed reports whether the certificate names a listed peer, as its CN or
// one of its DNS names.
func (r *routeAuth) listed(leaf *x509.Certificate) bool {
	if r.self != nil && bytes.Equal(leaf.Raw, r.self.Raw) {
		return true
	}
	if _, ok := r.names[leaf.Subject.CommonName]; ok {
		return true
	}
	for _, n := range leaf.DNSNames {
		if _, ok := r.names[n]; ok {
			return true
		}
	}
	return false
}

func (r *routeAuth) allowed(c server.ClientAuthentication) (bool, string) {
	if c.Kind() != server.ROUTER {
		return false, "not a route connection"
	}
	st := c.GetTLSConnectionState()
	if st == nil || len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return false, "no verified route certificate"
	}
	if len(r.names) == 0 {
		return true, ""
	}
	if r.listed(st.VerifiedChains[0][0]) {
		return true, ""
	}
	return false, "route certificate names no listed peer"
}

// routeURLs renders the configured routes for logs.
func routeURLs(routes []*url.URL) []string {
	out := make([]string, len(routes))
	for i, u := range routes {
		out[i] = u.String()
	}
	return out
}
