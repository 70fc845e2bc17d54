// Command fleetsim is the simulated fleet of the fault tests: real agents
// (the agent package, as muster-agent runs it) in one process, each with its
// own state directory, provisioning token and TLS connection to the
// provisioning brokers, restarting in process into production. Running the
// fleet outside the test process keeps its thousands of goroutines away from
// the race detector's limit, and lets a test kill the whole fleet at once.
//
// It runs until SIGTERM or SIGINT, then writes a JSON summary (per node: how
// many times it connected in production mode, and the error Run returned)
// to --summary.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/internal/token"
)

// Summary is what fleetsim writes at exit.
type Summary struct {
	// Production counts, per identity, the connections in production mode
	// (a node restarted into production once has 1).
	Production map[string]int `json:"production"`
	// Errors holds the error Run returned, per identity that had one.
	Errors map[string]string `json:"errors,omitempty"`
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

type options struct {
	dir, caFile, issuerSeed, summary, logFile, logLevel string
	identityFormat                                      string
	first, count                                        int
	brokers, provisionerKeys                            listFlag
	metadata, alive, wait, maxWait, ramp                time.Duration
}

// counter counts production connections per node.
type counter struct {
	mu   sync.Mutex
	prod map[string]int
}

func (c *counter) ModeChanged(id string, m agent.Mode, _ time.Time) {
	if m != agent.ModeProduction {
		return
	}
	c.mu.Lock()
	c.prod[id]++
	c.mu.Unlock()
}

func main() {
	var o options
	flag.StringVar(&o.dir, "dir", "", "root of the nodes' state directories (one per identity)")
	flag.StringVar(&o.identityFormat, "identity-format", "node%05d.fault.test", "identity of node i (a printf format with one integer)")
	flag.IntVar(&o.first, "first", 0, "index of the first node")
	flag.IntVar(&o.count, "count", 0, "number of nodes")
	flag.Var(&o.brokers, "broker", "provisioning broker URL (repeatable)")
	flag.StringVar(&o.caFile, "ca", "", "CA of the brokers")
	flag.StringVar(&o.issuerSeed, "issuer-seed", "", "token issuer seed file: each node gets a token for its identity")
	flag.Var(&o.provisionerKeys, "provisioner-key", "trusted provisioner public nkey (repeatable)")
	flag.DurationVar(&o.metadata, "metadata-interval", 5*time.Second, "mean metadata interval")
	flag.DurationVar(&o.alive, "alive-interval", 3*time.Second, "dead broker detection interval")
	flag.DurationVar(&o.wait, "reconnect-wait", 100*time.Millisecond, "first wait between reconnection rounds")
	flag.DurationVar(&o.maxWait, "reconnect-max-wait", 2*time.Second, "longest wait between reconnection rounds")
	flag.DurationVar(&o.ramp, "ramp", time.Second, "spread the agents' starts over this long")
	flag.StringVar(&o.summary, "summary", "", "file the summary is written to at exit")
	flag.StringVar(&o.logFile, "logfile", "", "log file (default stderr)")
	flag.StringVar(&o.logLevel, "loglevel", "warn", "log level")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "fleetsim:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	if o.dir == "" || o.count <= 0 || len(o.brokers) == 0 || o.caFile == "" || o.issuerSeed == "" || o.summary == "" {
		return errors.New("--dir, --count, --broker, --ca, --issuer-seed and --summary are required")
	}
	logger, closer, err := logging.New(o.logLevel, o.logFile)
	if err != nil {
		return err
	}
	defer closer.Close()
	caPEM, err := os.ReadFile(o.caFile)
	if err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	seed, err := os.ReadFile(o.issuerSeed)
	if err != nil {
		return fmt.Errorf("issuer seed: %w", err)
	}
	issuer, err := token.NewIssuer(seed)
	if err != nil {
		return fmt.Errorf("issuer seed: %w", err)
	}
	obs := &counter{prod: map[string]int{}}
	now := time.Now()
	agents := make([]*agent.Agent, 0, o.count)
	for i := o.first; i < o.first+o.count; i++ {
		id := fmt.Sprintf(o.identityFormat, i)
		tok, _, err := issuer.Create(token.Scope{Identity: id, Batch: "faulttest"}, now, 24*time.Hour)
		if err != nil {
			return fmt.Errorf("token for %s: %w", id, err)
		}
		a, err := agent.New(agent.Options{
			Identity: id,
			StateDir: filepath.Join(o.dir, id),
			Provisioning: agent.ProvisioningSettings{
				Brokers:     o.brokers,
				Token:       tok,
				TrustedKeys: o.provisionerKeys,
				CAPEM:       caPEM,
				Enabled:     true,
			},
			Version:          "faulttest",
			Logger:           logger.WithFields(logrus.Fields{"component": "agent", "identity": id}),
			MetadataInterval: o.metadata,
			AliveInterval:    o.alive,
			ReconnectWait:    o.wait,
			ReconnectMaxWait: o.maxWait,
			Observer:         obs,
		})
		if err != nil {
			return fmt.Errorf("agent %s: %w", id, err)
		}
		agents = append(agents, a)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs = map[string]string{}
	)
	step := o.ramp / time.Duration(len(agents))
	t := time.NewTimer(0)
	<-t.C
start:
	for i, a := range agents {
		if i > 0 && step > 0 {
			t.Reset(step)
			select {
			case <-ctx.Done():
				break start
			case <-t.C:
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.Run(ctx); err != nil {
				mu.Lock()
				errs[a.Identity()] = err.Error()
				mu.Unlock()
			}
		}()
	}
	fmt.Printf("fleetsim: %d agents running\n", len(agents))
	<-ctx.Done()
	wg.Wait()

	obs.mu.Lock()
	sum := Summary{Production: obs.prod, Errors: errs}
	b, err := json.Marshal(sum)
	obs.mu.Unlock()
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(o.summary, b, 0o600)
}
