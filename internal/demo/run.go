package demo

import (
	"context"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/muster-io/muster/internal/progress"
)

// Summary is what a demo run reports.
type Summary struct {
	Nodes       int     `json:"nodes"`
	Provisioned int     `json:"provisioned"`
	Failed      int     `json:"failed"`
	Seconds     float64 `json:"seconds"`
	NodesPerMin float64 `json:"nodes_per_min"`
	// ProductionMTLS counts nodes that answered rpcutil ping on the
	// production side, where every connection is mutual TLS.
	ProductionMTLS int `json:"production_mtls"`
	// Time from start to production, per node.
	P50Seconds float64 `json:"p50_seconds"`
	P99Seconds float64 `json:"p99_seconds"`
	MaxSeconds float64 `json:"max_seconds"`
	// Errors holds the last error of each node that did not make it
	// (at most 20).
	Errors map[string]string `json:"errors,omitempty"`
}

// RunOptions add the presentation to a fleet run.
type RunOptions struct {
	Options
	// Timeout bounds the whole run (default 5 minutes).
	Timeout time.Duration
	// Progress receives a progress bar; nil shows none.
	Progress io.Writer
}

// Run builds a fleet, provisions every node, checks each one answers on the
// production side over mutual TLS, and returns the summary.
func Run(ctx context.Context, ro RunOptions) (*Summary, error) {
	if ro.Timeout == 0 {
		ro.Timeout = 5 * time.Minute
	}
	var bar *progress.Meter
	if ro.Progress != nil {
		bar = progress.New(ro.Progress, ro.Nodes, progress.Options{Description: "provisioning", Unit: "nodes"})
		ro.OnProvisioned = func(string, time.Time) { bar.Add(1) }
		defer bar.Done()
	}
	f, err := New(ro.Options)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Start(ctx); err != nil {
		return nil, err
	}
	waitCtx, cancel := context.WithTimeout(ctx, ro.Timeout)
	defer cancel()
	reached := f.WaitProduction(waitCtx, ro.Nodes)
	elapsed := time.Since(f.Started())
	if bar != nil {
		bar.Done()
	}

	s := &Summary{Nodes: ro.Nodes, Provisioned: reached, Failed: ro.Nodes - reached, Seconds: elapsed.Seconds()}
	if elapsed > 0 {
		s.NodesPerMin = float64(reached) / elapsed.Minutes()
	}
	var lat []float64
	for _, at := range f.ProductionTimes() {
		lat = append(lat, at.Sub(f.Started()).Seconds())
	}
	sort.Float64s(lat)
	if len(lat) > 0 {
		s.P50Seconds = lat[len(lat)*50/100]
		s.P99Seconds = lat[min(len(lat)-1, len(lat)*99/100)]
		s.MaxSeconds = lat[len(lat)-1]
	}
	pingCtx, pingCancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer pingCancel()
	answered, err := f.PingProduction(pingCtx, 3*time.Second)
	if err != nil {
		return s, err
	}
	s.ProductionMTLS = len(answered)
	prod := f.ProductionTimes()
	for id, e := range f.Errors() {
		if _, ok := prod[id]; ok {
			continue
		}
		if s.Errors == nil {
			s.Errors = map[string]string{}
		}
		if len(s.Errors) < 20 {
			s.Errors[id] = e.Error()
		}
	}
	if err := f.Close(); err != nil {
		return s, err
	}
	return s, nil
}

// Print writes the summary as a short human table.
func (s *Summary) Print(w io.Writer) {
	fmt.Fprintf(w, "nodes            %d\n", s.Nodes)
	fmt.Fprintf(w, "provisioned      %d\n", s.Provisioned)
	fmt.Fprintf(w, "failed           %d\n", s.Failed)
	fmt.Fprintf(w, "production mTLS  %d answered rpcutil ping\n", s.ProductionMTLS)
	fmt.Fprintf(w, "time             %.2fs\n", s.Seconds)
	fmt.Fprintf(w, "rate             %.0f nodes/min\n", s.NodesPerMin)
	fmt.Fprintf(w, "time to prod     p50 %.2fs  p99 %.2fs  max %.2fs\n", s.P50Seconds, s.P99Seconds, s.MaxSeconds)
	ids := make([]string, 0, len(s.Errors))
	for id := range s.Errors {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		fmt.Fprintf(w, "error            %s: %s\n", id, s.Errors[id])
	}
}
