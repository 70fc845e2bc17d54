package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/syncbuf"
)

// waitUntil polls cond until it holds or the deadline passes.
func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// copyTree copies the files under src to dst, keeping their modes.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.MkdirAll(target, info.Mode().Perm())
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(target, data, info.Mode().Perm())
	})
	if err != nil {
		t.Fatalf("copy %s: %v", src, err)
	}
}

// clusterConfigs returns n broker configurations on random client ports
// that route to each other (every route list names all n brokers,
// including the broker itself).
func clusterConfigs(t *testing.T, n int) []Config {
	t.Helper()
	ports := natstest.FreePorts(t, n)
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
	}
	cfgs := make([]Config, n)
	for i := range n {
		cfg := testConfig(t)
		cfg.Cluster = ClusterConfig{
			Name:       "muster-test",
			ServerName: fmt.Sprintf("broker-%c", 'a'+i),
			Listen:     fmt.Sprintf("127.0.0.1:%d", ports[i]),
			Routes:     routes,
		}
		cfgs[i] = cfg
	}
	return cfgs
}

// startCluster starts one broker per configuration. The first one makes
// the development PKI (client CA, provisioner seed, cluster CA); it is
// copied into the others' store directories before they start, as
// docs/ha.md tells operators to. It waits until every broker routes to
// every other and JetStream has a meta leader.
func startCluster(t *testing.T, cfgs []Config) []*Broker {
	t.Helper()
	brokers := make([]*Broker, len(cfgs))
	for i, cfg := range cfgs {
		if i > 0 {
			copyTree(t, filepath.Join(cfgs[0].StoreDir, DevPKIDir), filepath.Join(cfg.StoreDir, DevPKIDir))
		}
		b, err := New(cfg, testLog())
		if err != nil {
			t.Fatalf("New %s: %v", cfg.Cluster.ServerName, err)
		}
		brokers[i] = b
	}
	for _, b := range brokers {
		if err := b.Start(); err != nil {
			t.Fatalf("Start: %v", err)
		}
		t.Cleanup(b.Shutdown)
	}
	waitClusterFormed(t, brokers)
	return brokers
}

// waitClusterFormed waits until every running broker sees every other
// running broker and JetStream has a current meta leader.
func waitClusterFormed(t *testing.T, brokers []*Broker) {
	t.Helper()
	waitUntil(t, 30*time.Second, "routes between every broker", func() bool {
		for _, b := range brokers {
			if b.Server().NumRemotes() < len(brokers)-1 {
				return false
			}
		}
		return true
	})
	waitUntil(t, 30*time.Second, "a JetStream meta leader", func() bool {
		leader := false
		for _, b := range brokers {
			srv := b.Server()
			if !srv.JetStreamIsCurrent() {
				return false
			}
			leader = leader || srv.JetStreamIsLeader()
		}
		return leader
	})
}

// connectedTo reports whether b has an authenticated client connection
// named name.
func connectedTo(t *testing.T, b *Broker, name string) bool {
	t.Helper()
	cz, err := b.Server().Connz(&server.ConnzOptions{Username: true, Limit: 1000})
	if err != nil {
		return false
	}
	for _, c := range cz.Conns {
		// Its account too: the server lists a connection by the name in
		// its CONNECT before it has authenticated it (seen under load).
		if c.Name == name && c.Account != "" {
			return true
		}
	}
	return false
}

func TestClusterConfigValidate(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f.pem")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	cluster := func(mod func(*Config)) Config {
		c := DefaultConfig()
		c.Cluster = ClusterConfig{Name: "c1", ServerName: "a", Listen: "127.0.0.1:6222",
			Routes: []string{"nats-route://127.0.0.1:6222", "nats-route://127.0.0.1:6223", "nats-route://localhost:6224"}}
		if mod != nil {
			mod(&c)
		}
		return c
	}
	cases := []struct {
		name    string
		cfg     Config
		keys    []string
		size    int
		replica int
	}{
		{name: "no cluster", cfg: DefaultConfig(), size: 1, replica: 1},
		{name: "three brokers, self listed", cfg: cluster(nil), size: 3, replica: 3},
		{name: "five brokers capped at three", cfg: cluster(func(c *Config) {
			c.Cluster.Routes = append(c.Cluster.Routes, "nats-route://h4:6222", "nats-route://h5:6222")
		}), size: 5, replica: 3},
		{name: "own host name with a wildcard listen", cfg: cluster(func(c *Config) {
			hn, _ := os.Hostname()
			c.Cluster.Listen = "0.0.0.0:6222"
			c.Cluster.Routes = []string{"nats-route://" + net.JoinHostPort(hn, "6222"), "nats-route://other:6222"}
		}), size: 2, replica: 2},
		{name: "explicit replicas", cfg: cluster(func(c *Config) { c.JetStream.Replicas = 2 }), size: 3, replica: 2},
		{name: "replicas over cluster size", cfg: cluster(func(c *Config) { c.JetStream.Replicas = 4 }), keys: []string{"jetstream.replicas"}},
		{name: "replicas without cluster", cfg: func() Config { c := DefaultConfig(); c.JetStream.Replicas = 3; return c }(), keys: []string{"jetstream.replicas"}},
		{name: "cluster without routes", cfg: cluster(func(c *Config) { c.Cluster.Routes = nil }), keys: []string{"cluster.routes"}},
		{name: "cluster key without listen", cfg: func() Config { c := DefaultConfig(); c.Cluster.Routes = []string{"nats-route://h:1"}; return c }(), keys: []string{"cluster.listen"}},
		{name: "bad everything", cfg: cluster(func(c *Config) {
			c.Cluster.Name = "has space"
			c.Cluster.ServerName = ""
			c.Cluster.Listen = "nohost"
			c.Cluster.Advertise = "x:y"
			c.Cluster.Routes = []string{"http://h:1", "nats-route://user:pw@h:1", "nats-route://h", "nats-route://h:1/path", "nats-route://h:0"}
			c.Cluster.TLS = TLSFiles{Cert: file}
			c.Cluster.InsecurePlaintextRoutes = true
			c.Cluster.PeerNames = []string{"bad name"}
			c.JetStream.Replicas = -1
		}), keys: []string{"cluster.name", "cluster.server_name", "cluster.listen", "cluster.advertise",
			"cluster.routes[0]", "cluster.routes[1]", "cluster.routes[2]", "cluster.routes[3]", "cluster.routes[4]",
			"cluster.tls.key", "cluster.tls.ca", "cluster.insecure_plaintext_routes", "cluster.peer_names[0]", "jetstream.replicas"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if len(tc.keys) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				if got := tc.cfg.ClusterSize(); got != tc.size {
					t.Errorf("ClusterSize = %d, want %d", got, tc.size)
				}
				if got := tc.cfg.Replicas(); got != tc.replica {
					t.Errorf("Replicas = %d, want %d", got, tc.replica)
				}
				return
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("Validate = %v, want ErrInvalidConfig", err)
			}
			for _, k := range tc.keys {
				if !strings.Contains(err.Error(), k+" ") {
					t.Errorf("error does not name %s:\n%v", k, err)
				}
			}
			if strings.Contains(err.Error(), ":pw") {
				t.Errorf("a route password appears in the error: %v", err)
			}
		})
	}
}

// TestClusterRejectsNodeCAAsClusterCA: a cluster CA that is also the client
// CA would let every production node join as a route, so it needs peer
// names.
func TestClusterRejectsNodeCAAsClusterCA(t *testing.T) {
	dir := t.TempDir()
	authority, err := ca.Init(filepath.Join(dir, "ca"), "shared CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	is, err := authority.Issue("broker-a", []string{"127.0.0.1", "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := authority.WriteIssued(dir, "broker", is)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca", ca.CertFile)
	cfg := clusterConfigs(t, 1)[0]
	cfg.TLS = TLSFiles{Cert: cert, Key: key, CA: caFile}
	cfg.Cluster.TLS = cfg.TLS
	cfg.TokenIssuers = []string{exampleIssuer}
	if _, err := New(cfg, testLog()); !errors.Is(err, ErrClusterCA) {
		t.Fatalf("New with the client CA as cluster CA = %v, want ErrClusterCA", err)
	}
	cfg.Cluster.PeerNames = []string{"broker-a"}
	b, err := New(cfg, testLog())
	if err != nil {
		t.Fatalf("New with peer names: %v", err)
	}
	b.Shutdown()
}

// TestRouteFromForeignCARefused: a server whose route certificate comes
// from another CA never joins the cluster.
func TestRouteFromForeignCARefused(t *testing.T) {
	cfgs := clusterConfigs(t, 2)
	good, err := New(cfgs[0], testLog())
	if err != nil {
		t.Fatal(err)
	}
	if err := good.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(good.Shutdown)
	// cfgs[1] gets its own development PKI, so its own cluster CA.
	intruder, err := New(cfgs[1], testLog())
	if err != nil {
		t.Fatal(err)
	}
	if err := intruder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(intruder.Shutdown)
	// Both keep trying to route to each other; give them a few rounds and
	// check with a connection that does go through that nothing formed.
	nc := connect(t, good, provisionerOpt(t, good))
	for range 20 {
		if err := nc.FlushTimeout(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		if good.Server().NumRemotes() != 0 || intruder.Server().NumRemotes() != 0 {
			t.Fatalf("a route formed between brokers with different cluster CAs")
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// TestClusterJetStreamR3SurvivesBrokerLoss forms a three-broker cluster,
// creates an R3 KV bucket, kills one broker and keeps reading and writing.
// Both accounts work across the cluster.
func TestClusterJetStreamR3SurvivesBrokerLoss(t *testing.T) {
	brokers := startCluster(t, clusterConfigs(t, 3))
	a, b, c := brokers[0], brokers[1], brokers[2]
	if d := b.DevCluster(); d == nil || d.CACert == "" || b.ClusterCAFile() != d.CACert {
		t.Fatalf("dev cluster PKI = %+v, cluster CA file %q", d, b.ClusterCAFile())
	}
	if got := c.JetStreamReplicas(); got != 3 {
		t.Fatalf("JetStreamReplicas = %d, want 3", got)
	}
	if !strings.HasPrefix(a.RouteURL(), "nats-route://127.0.0.1:") {
		t.Errorf("RouteURL = %q", a.RouteURL())
	}

	if got := clusterPeers(t, c); got != 2 {
		t.Errorf("muster_broker_cluster_peers = %v, want 2", got)
	}

	prov := connect(t, c, provisionerOpt(t, c), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	js, err := jetstream.New(prov)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var kv jetstream.KeyValue
	waitUntil(t, 30*time.Second, "an R3 KV bucket", func() bool {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "MUSTER_TEST", Replicas: c.JetStreamReplicas()})
		return err == nil
	})
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	info := st.(*jetstream.KeyValueBucketStatus).StreamInfo()
	if info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("stream replicas %d, cluster %+v", info.Config.Replicas, info.Cluster)
	}
	if _, err := kv.Put(ctx, "node1", []byte("claimed")); err != nil {
		t.Fatalf("put: %v", err)
	}

	// Kill the broker leading the bucket's stream unless it is the one
	// the client uses: the others must elect a new leader.
	victim := a
	for _, br := range []*Broker{a, b} {
		if br.cfg.Cluster.ServerName == info.Cluster.Leader {
			victim = br
		}
	}
	killedAt := time.Now()
	victim.Shutdown()
	// Each write on its own deadline, so that one stuck in the election
	// does not use up the wait; a loaded machine (several race-enabled
	// suites at once) has taken more than 30 s to elect.
	for deadline := time.Now().Add(60 * time.Second); ; {
		pctx, pcancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := kv.Put(pctx, "node2", []byte("claimed"))
		pcancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no write within 60 s of losing a broker; the last one: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("R3 bucket writable again %s after a broker began shutting down (it led the stream: %t)",
		time.Since(killedAt).Round(time.Millisecond), victim.cfg.Cluster.ServerName == info.Cluster.Leader)
	waitUntil(t, 20*time.Second, "muster_broker_cluster_peers to drop to 1", func() bool { return clusterPeers(t, c) == 1 })
	for _, k := range []string{"node1", "node2"} {
		e, err := kv.Get(ctx, k)
		if err != nil || string(e.Value()) != "claimed" {
			t.Fatalf("get %s after losing a broker: %v %v", k, e, err)
		}
	}
	if prov.ConnectedServerName() != c.cfg.Cluster.ServerName {
		t.Errorf("client moved to %q", prov.ConnectedServerName())
	}

	// Both accounts across the two surviving brokers.
	survivor := b
	if victim == b {
		survivor = a
	}
	testAccountsAcross(t, survivor, c)
}

// testAccountsAcross checks both accounts between a connection on x and one
// on y: an unprovisioned node on x answers a provisioner on y, a production
// node on x answers an admin on y, and y's provisioner sees x's production
// lifecycle events under the production prefix.
func testAccountsAcross(t *testing.T, x, y *Broker) {
	t.Helper()
	node := connect(t, x, nodeOpts(t, x, "node1.example.net")...)
	sub, err := node.Subscribe("provisioning.node.node1.example.net", func(m *nats.Msg) { _ = m.Respond([]byte("provisioning pong")) })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	prod := connect(t, x, issueClient(t, devCA(t, x), t.TempDir(), "node", "node1.example.net"))
	psub, err := prod.Subscribe("mcollective.node.node1.example.net", func(m *nats.Msg) { _ = m.Respond([]byte("production pong")) })
	if err != nil {
		t.Fatal(err)
	}
	defer psub.Unsubscribe()
	for _, nc := range []*nats.Conn{node, prod} {
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	prov := connect(t, y, provisionerOpt(t, y))
	admin := connect(t, y, adminOpt(y))
	events, err := prov.SubscribeSync("production.choria.lifecycle.event.>")
	if err != nil {
		t.Fatal(err)
	}
	if err := prov.Flush(); err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct {
		nc   *nats.Conn
		subj string
		want string
	}{
		{prov, "provisioning.node.node1.example.net", "provisioning pong"},
		{admin, "mcollective.node.node1.example.net", "production pong"},
	} {
		var reply *nats.Msg
		waitUntil(t, 10*time.Second, "a reply across the cluster on "+r.subj, func() bool {
			reply, err = r.nc.Request(r.subj, nil, 500*time.Millisecond)
			return err == nil
		})
		if string(reply.Data) != r.want {
			t.Errorf("%s: reply %q, want %q", r.subj, reply.Data, r.want)
		}
	}
	// The provisioner must not reach the production node's subject.
	if _, err := prov.Request("mcollective.node.node1.example.net", nil, 300*time.Millisecond); err == nil {
		t.Errorf("a provisioning connection reached a production subject")
	}
	waitUntil(t, 10*time.Second, "a production lifecycle event across the cluster", func() bool {
		if err := prod.Publish("choria.lifecycle.event.provisioned.muster-agent.node1.example.net", []byte("{}")); err != nil {
			t.Fatal(err)
		}
		_ = prod.Flush()
		m, err := events.NextMsg(200 * time.Millisecond)
		return err == nil && m.Subject == "production.choria.lifecycle.event.provisioned.muster-agent.node1.example.net"
	})
}

// clusterPeers reads muster_broker_cluster_peers from b's collector.
func clusterPeers(t *testing.T, b *Broker) float64 {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(b))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "muster_broker_cluster_peers" {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatal("no muster_broker_cluster_peers")
	return 0
}

// TestExampleClusterConfigs checks examples/cluster/broker-*.yaml: every key
// parses, the three brokers differ where they must and agree where they
// must, and the cluster they describe has three brokers and R3.
func TestExampleClusterConfigs(t *testing.T) {
	b := startBroker(t)
	dev := b.DevPKI()
	names, listens, clients := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, n := range []string{"a", "b", "c"} {
		data, err := os.ReadFile(filepath.Join("..", "examples", "cluster", "broker-"+n+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		// The TLS files exist only after the README's setup steps: point
		// them at real files and check everything else.
		cfg, err := ParseConfig(data)
		if err != nil {
			for _, e := range strings.Split(err.Error(), "\n") {
				if !strings.Contains(e, "tls.") {
					t.Fatalf("broker-%s.yaml: %v", n, e)
				}
			}
		}
		real := TLSFiles{Cert: dev.ServerCert, Key: dev.ServerKey, CA: dev.CACert}
		cfg.TLS, cfg.Cluster.TLS = real, real
		if err := cfg.Validate(); err != nil {
			t.Fatalf("broker-%s.yaml: %v", n, err)
		}
		if cfg.ClusterSize() != 3 || cfg.Replicas() != 3 || len(cfg.Cluster.PeerNames) != 3 || cfg.Cluster.Name != "muster-example" {
			t.Errorf("broker-%s.yaml: size %d, replicas %d, cluster %+v", n, cfg.ClusterSize(), cfg.Replicas(), cfg.Cluster)
		}
		names[cfg.Cluster.ServerName], listens[cfg.Cluster.Listen], clients[cfg.Listen] = true, true, true
	}
	if len(names) != 3 || len(listens) != 3 || len(clients) != 3 {
		t.Errorf("brokers share names or ports: %v %v %v", names, listens, clients)
	}
}

// TestRoutePeerNames: with a shared cluster CA, routes form only between
// brokers whose route certificates name a listed peer.
func TestRoutePeerNames(t *testing.T) {
	both := []string{"broker-a", "broker-b"}
	for _, tc := range []struct {
		name  string
		peers [2][]string // broker-a's and broker-b's lists
		forms bool
	}{
		{"listed peers", [2][]string{both, both}, true},
		{"unlisted peers", [2][]string{{"broker-z"}, {"broker-z"}}, false},
		// broker-a accepts broker-b, but broker-b's list leaves broker-a
		// out: broker-b must not join broker-a by dialing it.
		{"one side unlisted", [2][]string{both, {"broker-b"}}, false},
		// Each lists only the other: its own route is still accepted.
		{"own names unlisted", [2][]string{{"broker-b"}, {"broker-a"}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfgs := clusterConfigs(t, 2)
			var brokers []*Broker
			logs := [2]*syncbuf.Buffer{{}, {}}
			for i := range cfgs {
				cfgs[i].Cluster.PeerNames = tc.peers[i]
				if i > 0 {
					copyTree(t, filepath.Join(cfgs[0].StoreDir, DevPKIDir), filepath.Join(cfgs[i].StoreDir, DevPKIDir))
				}
				lg := logrus.New()
				lg.SetOutput(logs[i])
				b, err := New(cfgs[i], logrus.NewEntry(lg))
				if err != nil {
					t.Fatal(err)
				}
				brokers = append(brokers, b)
			}
			for _, b := range brokers {
				if err := b.Start(); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(b.Shutdown)
			}
			if tc.forms {
				waitClusterFormed(t, brokers)
				return
			}
			nc := connect(t, brokers[0], provisionerOpt(t, brokers[0]))
			for range 40 {
				if err := nc.FlushTimeout(5 * time.Second); err != nil {
					t.Fatal(err)
				}
				if brokers[0].Server().NumRemotes() != 0 || brokers[1].Server().NumRemotes() != 0 {
					t.Fatal("a route formed with a peer name that is not listed")
				}
				time.Sleep(25 * time.Millisecond)
			}
			// Every broker dials itself too (the routes list every
			// broker) and accepts that route whatever its list says:
			// nats-server drops it as a route to self. Over the second
			// above it has dialed itself at least once.
			for i, own := range []string{"broker-a", "broker-b"} {
				if out := logs[i].String(); strings.Contains(out, "peer_cn="+own) {
					t.Errorf("broker %d refused its own route:\n%s", i, out)
				}
			}
			// A broker whose list leaves the other out logs why, at the
			// latest when it next dials it (nats-server retries routes
			// every second).
			for i, peer := range []string{"broker-b", "broker-a"} {
				if slices.Contains(tc.peers[i], peer) {
					continue
				}
				waitUntil(t, 30*time.Second, fmt.Sprintf("broker %d logging its refusal of %s", i, peer), func() bool {
					out := logs[i].String()
					return strings.Contains(out, "route refused") && strings.Contains(out, "peer_cn="+peer)
				})
			}
		})
	}
}

// TestRouteAuthSelfAndRefusalLog checks that a broker accepts exactly its
// own route certificate whatever peer_names says (not another certificate
// with its name), and that refusals are logged once a second per peer, so
// one refused peer does not hide another.
func TestRouteAuthSelfAndRefusalLog(t *testing.T) {
	authority, err := ca.Init(filepath.Join(t.TempDir(), "ca"), "Test cluster CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	leaf := func(cn string) *x509.Certificate {
		is, err := authority.Issue(cn, nil)
		if err != nil {
			t.Fatal(err)
		}
		c, err := pki.ParseCertificates(is.CertPEM)
		if err != nil {
			t.Fatal(err)
		}
		return c[0]
	}
	self, sameName, b, c := leaf("broker-a"), leaf("broker-a"), leaf("broker-b"), leaf("broker-c")
	var out syncbuf.Buffer
	lg := logrus.New()
	lg.SetOutput(&out)
	r := newRouteAuth(logrus.NewEntry(lg), []string{"broker-z"}, self)
	state := func(c *x509.Certificate) tls.ConnectionState {
		return tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{c}}}
	}
	if err := r.verifyConnection(state(self)); err != nil {
		t.Errorf("own certificate refused: %v", err)
	}
	if err := r.verifyConnection(state(sameName)); !errors.Is(err, errRoutePeerUnlisted) {
		t.Errorf("another certificate with this broker's name: %v, want %v", err, errRoutePeerUnlisted)
	}
	for _, peer := range []*x509.Certificate{b, c, b, c} {
		if err := r.verifyConnection(state(peer)); !errors.Is(err, errRoutePeerUnlisted) {
			t.Errorf("%s: %v, want %v", peer.Subject.CommonName, err, errRoutePeerUnlisted)
		}
	}
	for cn, want := range map[string]int{"broker-a": 1, "broker-b": 1, "broker-c": 1} {
		if n := strings.Count(out.String(), "peer_cn="+cn); n != want {
			t.Errorf("%d refusals of %s logged, want %d (once a second per peer):\n%s", n, cn, want, out.String())
		}
	}

	var l refusalLimits
	now := time.Now()
	for i := range maxRefusalPeers {
		if _, ok := l.allow(fmt.Sprint("peer", i), now); !ok {
			t.Fatalf("first entry of peer %d held back", i)
		}
	}
	// Past the bound, new peers share one limit.
	if _, ok := l.allow("one more", now); !ok {
		t.Error("first peer past the bound held back")
	}
	if _, ok := l.allow("and another", now); ok {
		t.Error("second peer past the bound logged within the second")
	}
	if n, ok := l.allow("and another", now.Add(logEvery)); !ok || n != 1 {
		t.Errorf("a second later: logged %v, suppressed %d, want true and 1", ok, n)
	}
	if _, ok := l.allow("peer0", now.Add(logEvery/2)); ok {
		t.Error("peer0 logged twice within a second")
	}
}
