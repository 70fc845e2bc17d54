package dashboards

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/muster-io/muster/broker"
	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/internal/testbroker"
	"github.com/muster-io/muster/provisioner"
)

type noHelper struct{}

func (noHelper) Provision(context.Context, *helper.Request) (*helper.Reply, error) {
	return &helper.Reply{Defer: true}, nil
}

// registered returns the metric families the provisioner registers.
func registered(t *testing.T) map[string]bool {
	t.Helper()
	cfg := provisioner.DefaultConfig()
	cfg.Brokers = []string{"tls://127.0.0.1:4222"}
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := kp.Seed()
	cfg.NkeySeedFile = filepath.Join(t.TempDir(), "p.nk")
	if err := os.WriteFile(cfg.NkeySeedFile, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.InsecureTokenless = true // the metrics are the same either way
	p, err := provisioner.New(provisioner.Options{Config: cfg, Helper: noHelper{}, Logger: logging.Discard().WithField("component", "test")})
	if err != nil {
		t.Fatal(err)
	}
	return familyNames(t, p.Registry())
}

// brokerRegistered returns the metric families a running broker's
// collector serves.
func brokerRegistered(t *testing.T) map[string]bool {
	t.Helper()
	b := testbroker.Start(t)
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(broker.NewCollector(b)); err != nil {
		t.Fatal(err)
	}
	return familyNames(t, reg)
}

// familyNames gathers g and returns the names of its metric families.
func familyNames(t *testing.T, g prometheus.Gatherer) map[string]bool {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	return names
}

var metricName = regexp.MustCompile(`\bmuster_[a-z0-9_]+`)

// TestDashboardQueriesUseRegisteredMetrics checks every dashboard against
// the metrics its component registers: each query names only registered
// metrics, and the dashboard uses at least tc.least of them.
func TestDashboardQueriesUseRegisteredMetrics(t *testing.T) {
	cases := []struct {
		file, prefix string
		names        func(*testing.T) map[string]bool
		least        int
	}{
		{"muster-provisioner.json", "muster_provisioner_", registered, 10},
		{"muster-broker.json", "muster_broker_", brokerRegistered, 12},
	}
	for _, tc := range cases {
		t.Run(tc.file, func(t *testing.T) {
			checkDashboard(t, tc.file, tc.prefix, tc.names(t), tc.least)
		})
	}
}

// checkDashboard checks the dashboard in file against names.
func checkDashboard(t *testing.T, file, prefix string, names map[string]bool, least int) {
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Query any `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard is not valid JSON: %v", err)
	}
	var exprs []string
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	for _, v := range dash.Templating.List {
		if s, ok := v.Query.(string); ok {
			exprs = append(exprs, s)
		}
	}
	used := map[string]bool{}
	for _, e := range exprs {
		for _, m := range metricName.FindAllString(e, -1) {
			base := m
			for _, suf := range []string{"_bucket", "_count", "_sum"} {
				if b, ok := strings.CutSuffix(m, suf); ok && names[b] {
					base = b
				}
			}
			used[base] = true
			if !names[base] {
				t.Errorf("dashboard query %q uses %s, which is not registered", e, m)
			}
		}
	}
	if len(used) < least {
		t.Fatalf("only %d metrics found in the dashboard queries, want at least %d", len(used), least)
	}
	var unused []string
	for n := range names {
		if strings.HasPrefix(n, prefix) && !used[n] {
			unused = append(unused, n)
		}
	}
	sort.Strings(unused)
	if len(unused) > 0 {
		t.Logf("registered but not on the dashboard: %v", unused)
	}
}
