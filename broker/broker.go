// Package broker is Muster's provisioning broker: an embedded nats-server
// with two accounts on one TLS listener. Connections with a client
// certificate from the broker's CA land in PRODUCTION; provisioners (a
// listed nkey) and unprovisioned nodes (neither) land in PROVISIONING, which
// also sees PRODUCTION's lifecycle events under the prefix "production."
// and has JetStream. Without configured TLS the broker makes a development
// PKI in its store directory. With a cluster section it is one server of a
// NATS cluster: routes over mutual TLS with a separate cluster CA, checked
// by a route authenticator, and JetStream replicated by Raft.
package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// Sentinel errors.
var (
	// ErrServerFailed wraps fatal errors of the embedded nats-server.
	ErrServerFailed = errors.New("nats server failed")
	// ErrAlreadyStarted is returned by Start on a started broker.
	ErrAlreadyStarted = errors.New("broker already started")
	// ErrShutdown is returned by Start after Shutdown.
	ErrShutdown = errors.New("broker shut down")
	// ErrNotReady is returned when the server does not accept connections
	// in time.
	ErrNotReady = errors.New("broker not ready for connections")
)

// readyTimeout bounds how long Start waits for the listener.
const readyTimeout = 10 * time.Second

// Broker is the embedded provisioning broker.
type Broker struct {
	cfg    Config
	log    *logrus.Entry
	opts   *server.Options
	auth   *authenticator
	nlog   *natsLogger
	dev    *DevPKI
	caFile string
	caPEM  []byte
	caPin  string
	host   string // listen host as configured
	// internalKey is the broker's own provisioner-kind nkey, for the
	// in-process connection that publishes advisories.
	internalKey nkeys.KeyPair

	devCluster    *DevCluster
	clusterCAFile string

	mu       sync.Mutex
	srv      *server.Server
	advisory *nats.Conn
	started  bool
	closed   bool
}

// New validates cfg, makes or reuses the development PKI when no TLS is
// configured, loads the TLS material and prepares the server options. It
// starts no goroutine.
func New(cfg Config, log *logrus.Entry) (*Broker, error) {
	if log == nil {
		return nil, fmt.Errorf("%w: nil logger", ErrInvalidConfig)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Provisioners = append([]string(nil), cfg.Provisioners...)
	cfg.Admins = append([]string(nil), cfg.Admins...)
	cfg.TokenIssuers = append([]string(nil), cfg.TokenIssuers...)
	host, port := splitHostPort(cfg.Listen)
	b := &Broker{cfg: cfg, log: log, host: host}

	tlsFiles := cfg.TLS
	if tlsFiles.empty() {
		dev, err := ensureDevPKI(filepath.Join(cfg.StoreDir, DevPKIDir), serverHosts(host), time.Now())
		if err != nil {
			return nil, err
		}
		b.dev = dev
		tlsFiles = TLSFiles{Cert: dev.ServerCert, Key: dev.ServerKey, CA: dev.CACert}
		b.cfg.Provisioners = appendMissing(b.cfg.Provisioners, dev.ProvisionerPublicKey)
		b.cfg.Admins = appendMissing(b.cfg.Admins, DevAdminCN)
		b.cfg.TokenIssuers = appendMissing(b.cfg.TokenIssuers, dev.TokenIssuerPublicKey)
	}
	tlsConfig, clientCAs, err := b.loadTLS(tlsFiles)
	if err != nil {
		return nil, err
	}

	b.nlog = newNATSLogger(log)
	b.internalKey, err = nkeys.CreateUser()
	if err != nil {
		return nil, fmt.Errorf("broker internal nkey: %w", err)
	}
	internalPub, _ := b.internalKey.PublicKey()
	b.auth, err = newAuthenticator(log, b.cfg)
	if err != nil {
		return nil, err
	}
	b.auth.provisioners[internalPub] = struct{}{}
	b.auth.onDuplicate = b.publishDuplicate
	opts := &server.Options{
		Host:       host,
		Port:       port,
		NoSigs:     true,
		MaxPayload: int32(cfg.MaxPayload),
		JetStream:  true,
		StoreDir:   cfg.StoreDir,
		TLSConfig:  tlsConfig,
		TLSVerify:  false,
		TLSTimeout: cfg.TLSTimeout,
		// nats-server pings a new client 2 s after it connected; a client
		// still waiting for the PONG of its CONNECT then reads that PING
		// instead and gives up (nats.go: "expected 'PONG', got 'PING'").
		// Connections that slow happen when a whole site powers on, and
		// every one given up is a TLS handshake to do again: the first
		// ping comes at the ping interval instead.
		DisableShortFirstPing:      true,
		AlwaysEnableNonce:          true,
		CustomClientAuthentication: b.auth,
		Accounts:                   []*server.Account{server.NewAccount(PRODUCTION), server.NewAccount(PROVISIONING)},
	}
	if lvl := log.Logger.GetLevel(); lvl >= logrus.DebugLevel {
		opts.Debug = true
		opts.Trace = lvl >= logrus.TraceLevel
	}
	if cfg.MonitorListen != "" {
		opts.HTTPHost, opts.HTTPPort = splitHostPort(cfg.MonitorListen)
	}
	if cfg.Cluster.Enabled() {
		if err := b.setupCluster(opts, clientCAs); err != nil {
			return nil, err
		}
	}
	b.opts = opts
	return b, nil
}

// loadTLS loads the server certificate and the client CA.
func (b *Broker) loadTLS(f TLSFiles) (*tls.Config, []*x509.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: tls.cert %q / tls.key %q: %w", ErrInvalidConfig, f.Cert, f.Key, err)
	}
	// The chain is sent as the file has it, CA included
	// (ca.WriteIssued appends it): an agent that knows only the CA's pin
	// finds its trust anchor among the certificates sent. Clients that
	// hold the CA pay one more signature check per handshake for it.
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: tls.ca %q: %w", ErrInvalidConfig, f.CA, err)
	}
	cas, err := pki.ParseCertificates(caPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: tls.ca %q: %w", ErrInvalidConfig, f.CA, err)
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		pool.AddCert(c)
	}
	b.caFile, b.caPEM, b.caPin = f.CA, caPEM, pki.Pin(cas[0])
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    pool,
	}, cas, nil
}

// Start starts the server, waits until it accepts connections and enables
// JetStream on the PROVISIONING account. A broker whose Start failed is shut
// down: make a new one to try again.
func (b *Broker) Start() (err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.closed:
		return ErrShutdown
	case b.started:
		return ErrAlreadyStarted
	}
	defer func() {
		if err != nil {
			b.closed = true
		}
	}()
	srv, err := server.NewServer(b.opts)
	if err != nil {
		return fmt.Errorf("new nats server: %w", err)
	}
	srv.SetLoggerV2(b.nlog, b.opts.Debug, b.opts.Trace, false)
	if b.cfg.Cluster.InsecurePlaintextRoutes {
		b.log.Warn("INSECURE: cluster routes use neither TLS nor authentication (cluster.insecure_plaintext_routes); anyone reaching the route port joins the cluster and sees every message")
	}
	if err := b.wireAccounts(srv); err != nil {
		srv.Shutdown()
		return err
	}
	srv.Start()
	if err := b.waitReady(srv); err != nil {
		srv.Shutdown()
		srv.WaitForShutdown()
		return fmt.Errorf("start broker on %s: %w", b.cfg.Listen, err)
	}
	if err := b.auth.provisioning.EnableJetStream(nil, nil); err != nil {
		srv.Shutdown()
		srv.WaitForShutdown()
		return fmt.Errorf("enable jetstream on %s: %w", PROVISIONING, err)
	}
	b.auth.setServer(srv)
	adv, err := nats.Connect("", nats.InProcessServer(srv), nats.Name("muster-broker-advisories"),
		nats.Nkey(mustPublic(b.internalKey), b.internalKey.Sign), nats.MaxReconnects(-1))
	if err != nil {
		srv.Shutdown()
		srv.WaitForShutdown()
		return fmt.Errorf("broker advisory connection: %w", err)
	}
	b.advisory = adv
	b.srv, b.started = srv, true
	if b.cfg.InsecureOpenProvisioning {
		b.log.Warn("INSECURE: insecure_open_provisioning is on; any client can join the provisioning account without a token")
	}
	fields := logrus.Fields{"url": b.clientURL(srv), "ca_file": b.caFile, "ca_pin": b.caPin}
	if b.dev != nil {
		fields["provisioner_seed_file"] = b.dev.ProvisionerSeed
		fields["token_issuer_seed_file"] = b.dev.TokenIssuerSeed
		fields["admin_cert"] = b.dev.AdminCert
	}
	if b.cfg.Cluster.Enabled() {
		fields["cluster"] = b.cfg.Cluster.Name
		fields["server_name"] = b.cfg.Cluster.ServerName
		fields["route_url"] = b.routeURL(srv)
		fields["routes"] = routeURLs(b.opts.Routes)
		fields["cluster_ca_file"] = b.clusterCAFile
		fields["jetstream_replicas"] = b.cfg.Replicas()
	}
	b.log.WithFields(fields).Info("broker ready")
	return nil
}

// waitReady polls until srv accepts connections, failing early on a fatal
// server error.
func (b *Broker) waitReady(srv *server.Server) error {
	deadline := time.Now().Add(readyTimeout)
	for {
		if ferr := b.nlog.firstFatal(); ferr != nil {
			return ferr
		}
		if srv.ReadyForConnections(50 * time.Millisecond) {
			return nil
		}
		if time.Now().After(deadline) {
			return ErrNotReady
		}
	}
}

// wireAccounts hands the server's accounts to the authenticator and sets
// up PRODUCTION's lifecycle export and PROVISIONING's import.
func (b *Broker) wireAccounts(srv *server.Server) error {
	prod, err := srv.LookupAccount(PRODUCTION)
	if err != nil {
		return fmt.Errorf("account %s: %w", PRODUCTION, err)
	}
	prov, err := srv.LookupAccount(PROVISIONING)
	if err != nil {
		return fmt.Errorf("account %s: %w", PROVISIONING, err)
	}
	if err := prod.AddStreamExport(LifecycleExport, nil); err != nil {
		return fmt.Errorf("export %s from %s: %w", LifecycleExport, PRODUCTION, err)
	}
	if err := prov.AddStreamImport(prod, LifecycleExport, ProductionPrefix); err != nil {
		return fmt.Errorf("import %s into %s: %w", LifecycleExport, PROVISIONING, err)
	}
	b.auth.production, b.auth.provisioning = prod, prov
	return nil
}

// Run starts the broker (unless already started) and blocks until ctx is
// done or the server stops on its own; it then shuts the broker down. It
// returns nil after ctx is done and an error wrapping ErrServerFailed when
// the server failed.
func (b *Broker) Run(ctx context.Context) error {
	if err := b.Start(); err != nil && !errors.Is(err, ErrAlreadyStarted) {
		return err
	}
	srv := b.Server()
	stopped := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		srv.WaitForShutdown()
		close(stopped)
	}()
	var err error
	select {
	case <-ctx.Done():
	case err = <-b.nlog.fatal:
	case <-stopped:
		err = b.nlog.firstFatal()
		if err == nil {
			err = fmt.Errorf("%w: server stopped", ErrServerFailed)
		}
	}
	b.Shutdown()
	wg.Wait()
	return err
}

// Shutdown stops the server and waits until it is down. It may be called
// any number of times, also before Start.
func (b *Broker) Shutdown() {
	b.mu.Lock()
	b.closed = true
	srv, adv := b.srv, b.advisory
	b.mu.Unlock()
	if adv != nil {
		adv.Close()
	}
	if srv == nil {
		return
	}
	srv.Shutdown()
	srv.WaitForShutdown()
}

// publishDuplicate announces on protocol.AdvisoryDuplicateIdentity that
// two machines claim identity. It runs inside the authenticator and never
// blocks: nats.Conn.Publish only buffers.
func (b *Broker) publishDuplicate(identity, remote string) {
	b.log.WithFields(logrus.Fields{"identity": identity, "remote": remote}).Warn("second live connection from another address claims an identity")
	b.mu.Lock()
	adv := b.advisory
	b.mu.Unlock()
	if adv == nil {
		return
	}
	data, err := protocol.Marshal(protocol.DuplicateIdentity{
		Protocol: protocol.AdvisoryProtocol, Identity: identity, Time: time.Now().UTC(),
	})
	if err == nil {
		err = adv.Publish(protocol.AdvisoryDuplicateIdentity, data)
	}
	if err != nil {
		b.log.WithError(err).Warn("publish duplicate identity advisory")
	}
}

func mustPublic(kp nkeys.KeyPair) string {
	pub, err := kp.PublicKey()
	if err != nil {
		panic(err) // a freshly created key pair always has a public key
	}
	return pub
}

// Server returns the embedded server (nil before Start), e.g. for
// nats.InProcessServer.
func (b *Broker) Server() *server.Server {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.srv
}

// ClientURL returns the client URL, tls://host:port, with the real port
// once started. A wildcard listen host is reported as 127.0.0.1.
func (b *Broker) ClientURL() string {
	return b.clientURL(b.Server())
}

func (b *Broker) clientURL(srv *server.Server) string {
	host := b.host
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	port := b.opts.Port
	if srv != nil {
		if addr, ok := srv.Addr().(*net.TCPAddr); ok {
			port = addr.Port
		}
	}
	if port < 0 {
		port = 0
	}
	u := url.URL{Scheme: "tls", Host: net.JoinHostPort(host, strconv.Itoa(port))}
	return u.String()
}

// CAFile returns the path of the CA certificate clients verify the broker
// with (and client certificates must chain to).
func (b *Broker) CAFile() string { return b.caFile }

// CAPEM returns the CA certificate(s) as PEM.
func (b *Broker) CAPEM() []byte { return append([]byte(nil), b.caPEM...) }

// CAPin returns the pin (sha256:<hex>) of the CA's public key.
func (b *Broker) CAPin() string { return b.caPin }

// DevPKI returns the development PKI, or nil when TLS was configured.
func (b *Broker) DevPKI() *DevPKI {
	if b.dev == nil {
		return nil
	}
	d := *b.dev
	return &d
}

// JetStreamReplicas is the replica count for the streams and KV buckets
// Muster creates: jetstream.replicas, or min(3, cluster size).
func (b *Broker) JetStreamReplicas() int { return b.cfg.Replicas() }

// RouteURL returns this broker's route URL, nats-route://host:port with the
// real port once started, or "" when clustering is off.
func (b *Broker) RouteURL() string { return b.routeURL(b.Server()) }

func (b *Broker) routeURL(srv *server.Server) string {
	if !b.cfg.Cluster.Enabled() {
		return ""
	}
	host, _ := splitHostPort(b.cfg.Cluster.Listen)
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	port := b.opts.Cluster.Port
	if srv != nil {
		if addr := srv.ClusterAddr(); addr != nil {
			port = addr.Port
		}
	}
	if port < 0 {
		port = 0
	}
	u := url.URL{Scheme: "nats-route", Host: net.JoinHostPort(host, strconv.Itoa(port))}
	return u.String()
}

// ClusterCAFile returns the CA route certificates must chain to, or "" when
// clustering is off or routes are plaintext.
func (b *Broker) ClusterCAFile() string { return b.clusterCAFile }

// DevCluster returns the development cluster PKI, or nil when cluster.tls
// was configured or clustering is off.
func (b *Broker) DevCluster() *DevCluster {
	if b.devCluster == nil {
		return nil
	}
	d := *b.devCluster
	return &d
}

// appendMissing appends v to list unless it is there.
func appendMissing(list []string, v string) []string {
	for _, x := range list {
		if x == v {
			return list
		}
	}
	return append(list, v)
}
