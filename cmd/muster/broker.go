package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/muster-io/muster/broker"
	"github.com/muster-io/muster/internal/logging"
)

func newBrokerCmd() *cobra.Command {
	var (
		configFile  string
		checkConfig bool
	)
	cmd := &cobra.Command{
		Use:   "broker",
		Short: "Run the provisioning broker (embedded NATS, two accounts, JetStream)",
		Long: `Runs Muster's broker: an embedded nats-server with one TLS client listener and two accounts.

  PRODUCTION    connections with a client certificate from the broker's CA (user = the CN;
                CNs listed in "admins" are admins). Exports choria.lifecycle.event.>.
  PROVISIONING  provisioners (an nkey listed in "provisioners", signing the server nonce) and
                unprovisioned nodes (neither certificate nor nkey). Sees PRODUCTION's lifecycle
                events as production.choria.lifecycle.event.>, and has JetStream.

TLS is required; client certificates are verified when given. With no "tls" configured the broker
makes a development PKI in <store_dir>/pki on first start and reuses it later: ca.pem/ca-key.pem,
server.pem (localhost, 127.0.0.1, ::1 and the listen host), admin.pem (CN muster-admin, an admin)
and provisioner.nk (an nkey seed, 0600, allowed as provisioner).

With a "cluster" section the broker joins a NATS cluster: routes to the other brokers over mutual
TLS with route certificates from a cluster CA (cluster.tls; without it a development cluster CA is
made in <store_dir>/pki/cluster), JetStream replicated by Raft (jetstream.replicas, default
min(3, cluster size)). Both accounts span the cluster. See docs/ha.md and examples/cluster/.

On start it prints the client URL, the CA file and its pin (sha256:...), the development PKI
paths and, when clustered, the route URL and cluster CA. With metrics_listen set it serves
Prometheus metrics (muster_broker_*) on /metrics and /healthz there. It runs until SIGINT or
SIGTERM. See docs/broker.md for the configuration keys.`,
		Example: `  muster broker                                   # defaults: 127.0.0.1:4222, dev PKI in ./muster-broker-data/pki
  muster broker --config examples/broker.yaml
  muster broker --config broker.yaml --check-config
  muster broker --config examples/cluster/broker-a.yaml   # one of three clustered brokers
  nats --tlsca muster-broker-data/pki/ca.pem -s tls://127.0.0.1:4222 sub 'choria.>'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := broker.LoadConfig(configFile)
			if err != nil {
				return err
			}
			if checkConfig {
				fmt.Fprintln(cmd.OutOrStdout(), "broker configuration OK")
				return nil
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runBroker(ctx, cmd.OutOrStdout(), cfg)
		},
	}
	cmd.Flags().StringVarP(&configFile, "config", "c", "", "broker configuration file (YAML); defaults when empty")
	cmd.Flags().BoolVar(&checkConfig, "check-config", false, "validate the configuration and exit")
	return cmd
}

// runBroker runs the broker and, when configured, its metrics endpoint
// until ctx is done.
func runBroker(ctx context.Context, out io.Writer, cfg broker.Config) error {
	logger, closer, err := logging.New(cfg.LogLevel, cfg.LogFile)
	if err != nil {
		return err
	}
	defer closer.Close()
	log := logger.WithField("component", "broker")

	b, err := broker.New(cfg, log)
	if err != nil {
		return err
	}
	var (
		metricsLn net.Listener
		hs        *http.Server
	)
	if cfg.MetricsListen != "" {
		if hs, err = metricsServer(b); err != nil {
			return err
		}
		if metricsLn, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			return fmt.Errorf("metrics_listen %s: %w", cfg.MetricsListen, err)
		}
	}
	if err := b.Start(); err != nil {
		if metricsLn != nil {
			metricsLn.Close()
		}
		return err
	}
	fmt.Fprintf(out, "broker listening on %s\nCA file           %s\nCA pin            %s\n", b.ClientURL(), b.CAFile(), b.CAPin())
	if d := b.DevPKI(); d != nil {
		fmt.Fprintf(out, "dev PKI           %s\n  provisioner seed %s\n  admin cert       %s\n  admin key        %s\n",
			d.Dir, d.ProvisionerSeed, d.AdminCert, d.AdminKey)
	}
	if cfg.Cluster.Enabled() {
		fmt.Fprintf(out, "cluster           %s as %s, route URL %s\nJetStream replicas %d\n",
			cfg.Cluster.Name, cfg.Cluster.ServerName, b.RouteURL(), b.JetStreamReplicas())
		if f := b.ClusterCAFile(); f != "" {
			fmt.Fprintf(out, "cluster CA file   %s\n", f)
		} else {
			fmt.Fprintf(out, "cluster routes    INSECURE: no TLS, no authentication\n")
		}
	}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	if metricsLn != nil {
		fmt.Fprintf(out, "metrics           http://%s/metrics\n", metricsLn.Addr())
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := hs.Serve(metricsLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				cancel(fmt.Errorf("metrics server: %w", err))
			}
		}()
	}
	runErr := b.Run(ctx)
	if metricsLn != nil {
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = hs.Shutdown(sctx)
		scancel()
	}
	wg.Wait()
	if runErr != nil {
		return runErr
	}
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	log.Info("broker stopped")
	return nil
}

// metricsServer serves /metrics from a private registry and /healthz.
func metricsServer(b *broker.Broker) (*http.Server, error) {
	reg := prometheus.NewRegistry()
	if err := reg.Register(broker.NewCollector(b)); err != nil {
		return nil, fmt.Errorf("register broker metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if srv := b.Server(); srv == nil || !srv.Running() {
			http.Error(w, "broker not running", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, nil
}
