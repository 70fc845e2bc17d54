package provisioner

import (
	"encoding/json"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Status is the JSON document served on /status.
type Status struct {
	Connected     bool          `json:"connected"`
	Paused        bool          `json:"paused"`
	Workers       int           `json:"workers"`
	BusyWorkers   int           `json:"busy_workers"`
	QueueDepth    int           `json:"queue_depth"`
	QueueCapacity int           `json:"queue_capacity"`
	Nodes         int           `json:"nodes"`
	States        map[State]int `json:"states"`
}

// Status returns the provisioner's counts.
func (p *Provisioner) Status() Status {
	s := Status{
		Connected:     p.connected(),
		Workers:       p.cfg.Workers,
		QueueDepth:    len(p.queue),
		QueueCapacity: cap(p.queue),
		States:        map[State]int{},
	}
	p.mu.Lock()
	s.Paused = p.paused
	s.Nodes = len(p.nodes)
	for _, n := range p.nodes {
		s.States[n.State]++
		if n.State == StateInProgress {
			s.BusyWorkers++
		}
	}
	p.mu.Unlock()
	return s
}

// Handler serves the monitor: GET /metrics, /healthz (200 when connected to
// a broker, 503 otherwise), /status (JSON counts), /nodes (JSON per-node
// status); POST /pause and /resume.
func (p *Provisioner) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(p.m.reg, promhttp.HandlerOpts{Registry: p.m.reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if !p.connected() {
			http.Error(w, "not connected", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, p.Status())
	})
	mux.HandleFunc("GET /nodes", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, p.Nodes())
	})
	mux.HandleFunc("POST /pause", func(w http.ResponseWriter, _ *http.Request) {
		p.Pause()
		writeJSON(w, p.Status())
	})
	mux.HandleFunc("POST /resume", func(w http.ResponseWriter, _ *http.Request) {
		p.Resume()
		writeJSON(w, p.Status())
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
