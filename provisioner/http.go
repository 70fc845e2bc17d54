package provisioner

import (
	"encoding/json"
	"errors"
	"net/http"

	"github.com/muster-io/muster/internal/protocol"

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
	}
	p.mu.Lock()
	s.Paused = p.paused
	s.Nodes = len(p.nodes)
	s.States = p.stateCountsLocked()
	p.mu.Unlock()
	s.BusyWorkers = s.States[StateInProgress]
	return s
}

// OperatorHeader must be present (any value) on POST /nodes/{id}/approve and
// /deny, so a web page the operator's browser visits cannot send them (a
// custom header needs a CORS preflight the monitor never grants).
const OperatorHeader = "Muster-Operator"

// Handler serves the monitor: GET /metrics, /healthz (200 when connected to
// a broker, 503 otherwise), /status (JSON counts), /nodes (JSON per-node
// status), /nodes/held (held nodes), /nodes/{id} (one node with its
// registry record); POST /pause, /resume, /nodes/{id}/approve and
// /nodes/{id}/deny.
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
	mux.HandleFunc("GET /nodes/held", func(w http.ResponseWriter, _ *http.Request) {
		held := p.HeldNodes()
		if held == nil {
			held = []NodeStatus{}
		}
		writeJSON(w, held)
	})
	mux.HandleFunc("GET /nodes/{id}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if err := protocol.ValidateIdentity(id); err != nil {
			http.Error(w, "invalid identity", http.StatusBadRequest)
			return
		}
		d, ok, err := p.Node(id)
		if err != nil {
			p.log.WithField("identity", id).WithError(err).Error("read identity registry")
			http.Error(w, "identity registry unavailable", http.StatusInternalServerError)
			return
		}
		if !ok {
			http.Error(w, "unknown node", http.StatusNotFound)
			return
		}
		writeJSON(w, d)
	})
	mux.HandleFunc("POST /nodes/{id}/approve", p.decision(p.Approve))
	mux.HandleFunc("POST /nodes/{id}/deny", p.decision(p.Deny))
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

// decision serves approve or deny: 200 with the node, 400 for a bad
// identity or a missing OperatorHeader, 404 unknown, 409 not held, 503
// queue full.
func (p *Provisioner) decision(do func(string) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(OperatorHeader) == "" {
			http.Error(w, "missing "+OperatorHeader+" header", http.StatusBadRequest)
			return
		}
		id := r.PathValue("id")
		if err := protocol.ValidateIdentity(id); err != nil {
			http.Error(w, "invalid identity", http.StatusBadRequest)
			return
		}
		err := do(id)
		switch {
		case errors.Is(err, ErrUnknownNode):
			http.Error(w, "unknown node", http.StatusNotFound)
			return
		case errors.Is(err, ErrNotHeld):
			http.Error(w, err.Error(), http.StatusConflict)
			return
		case errors.Is(err, ErrQueueFull):
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		case err != nil:
			p.log.WithField("identity", id).WithError(err).Error("operator decision")
			http.Error(w, "decision taken but not recorded; see the provisioner log", http.StatusInternalServerError)
			return
		}
		d, _, _ := p.Node(id)
		writeJSON(w, d)
	}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
