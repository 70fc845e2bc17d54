package provisioner

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

const metricsNamespace = "muster"
const metricsSubsystem = "provisioner"

// Discovery sources (label values of discovered_total).
const (
	sourceMetadata  = "metadata"
	sourceStartup   = "startup"
	sourceDiscovery = "discovery"
	// sources that only appear in invalid_messages_total
	sourceProduction = "production"
	sourceReply      = "reply"
	sourceAdvisory   = "advisory"
)

// Helper outcomes (label values of helper_duration_seconds).
const (
	helperConfigure = "configure"
	helperDefer     = "defer"
	helperShutdown  = "shutdown"
	helperError     = "error"
)

type metrics struct {
	reg *prometheus.Registry

	discovered   *prometheus.CounterVec
	provisioned  prometheus.Counter
	deferred     prometheus.Counter
	shutdown     prometheus.Counter
	errors       *prometheus.CounterVec
	retries      *prometheus.CounterVec
	invalid      *prometheus.CounterVec
	shed         prometheus.Counter
	busy         prometheus.Gauge
	paused       prometheus.Gauge
	arrivals     prometheus.Counter
	rpcDuration  *prometheus.HistogramVec
	helperDur    *prometheus.HistogramVec
	queueWait    prometheus.Histogram
	nodeDuration prometheus.Histogram
	clockOffset  prometheus.Histogram

	tokenRefusals      *prometheus.CounterVec
	standby            prometheus.Gauge
	policyRejections   *prometheus.CounterVec
	completedOnArrival prometheus.Counter
	claimsLost         *prometheus.CounterVec
	claimConflicts     prometheus.Counter
}

func newMetrics(queueDepth func() float64, states func() map[State]int, intakeDropped func() map[string]int64, capacity, workers int) (*metrics, error) {
	opts := func(name, help string) prometheus.Opts {
		return prometheus.Opts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help}
	}
	hopts := func(name, help string, buckets []float64) prometheus.HistogramOpts {
		return prometheus.HistogramOpts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help, Buckets: buckets}
	}
	durBuckets := []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}
	longBuckets := []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}

	m := &metrics{
		reg:          prometheus.NewRegistry(),
		discovered:   prometheus.NewCounterVec(prometheus.CounterOpts(opts("discovered_total", "Node announcements received, by source.")), []string{"source"}),
		provisioned:  prometheus.NewCounter(prometheus.CounterOpts(opts("provisioned_total", "Nodes configured and restarted."))),
		deferred:     prometheus.NewCounter(prometheus.CounterOpts(opts("deferred_total", "Nodes the helper deferred."))),
		shutdown:     prometheus.NewCounter(prometheus.CounterOpts(opts("shutdown_total", "Nodes told to shut down by the helper."))),
		errors:       prometheus.NewCounterVec(prometheus.CounterOpts(opts("errors_total", "Failed node provisioning attempts, by pipeline stage.")), []string{"stage"}),
		retries:      prometheus.NewCounterVec(prometheus.CounterOpts(opts("retries_total", "RPC retries after a timeout or no responders, by pipeline stage.")), []string{"stage"}),
		invalid:      prometheus.NewCounterVec(prometheus.CounterOpts(opts("invalid_messages_total", "Malformed messages dropped, by source.")), []string{"source"}),
		shed:         prometheus.NewCounter(prometheus.CounterOpts(opts("queue_shed_total", "Node announcements dropped because the queue was full."))),
		busy:         prometheus.NewGauge(prometheus.GaugeOpts(opts("busy_workers", "Workers provisioning a node now."))),
		paused:       prometheus.NewGauge(prometheus.GaugeOpts(opts("paused", "1 while the provisioner is paused."))),
		arrivals:     prometheus.NewCounter(prometheus.CounterOpts(opts("production_arrivals_total", "Arrivals in production seen: provisioned lifecycle events from the production side, each ID counted once."))),
		rpcDuration:  prometheus.NewHistogramVec(hopts("rpc_duration_seconds", "Duration of one RPC attempt to a node, by action.", durBuckets), []string{"action"}),
		helperDur:    prometheus.NewHistogramVec(hopts("helper_duration_seconds", "Duration of helper runs, by outcome.", durBuckets), []string{"outcome"}),
		queueWait:    prometheus.NewHistogram(hopts("queue_wait_seconds", "Time a node waited in the queue.", longBuckets)),
		nodeDuration: prometheus.NewHistogram(hopts("node_duration_seconds", "Time from dequeue to restart acknowledged.", longBuckets)),
		clockOffset: prometheus.NewHistogram(hopts("node_clock_offset_seconds",
			"How far nodes' clocks are from the provisioner's, either way, estimated from the time in each reply.",
			[]float64{0.1, 0.5, 1, 5, 10, 30, 60, 300, 3600, 86400})),

		tokenRefusals: prometheus.NewCounterVec(prometheus.CounterOpts(opts("token_refusals_total", "Nodes refused for their provisioning token, by reason.")), []string{"reason"}),
	}
	for _, r := range tokenReasons {
		m.tokenRefusals.WithLabelValues(r)
	}
	m.standby = prometheus.NewGauge(prometheus.GaugeOpts(opts("standby", "1 while a provisioner in leader mode is not the leader.")))
	m.completedOnArrival = prometheus.NewCounter(prometheus.CounterOpts(opts("completed_on_arrival_total",
		"Provisionings counted from the node's arrival in production because their restart was never confirmed (ha modes).")))
	m.claimsLost = prometheus.NewCounterVec(prometheus.CounterOpts(opts("claims_lost_total",
		"Attempts stopped because their claim on the node was lost (renewals missed the lease, or the claim was removed), by pipeline stage (ha claims and leader modes).")), []string{"stage"})
	m.claimConflicts = prometheus.NewCounter(prometheus.CounterOpts(opts("claim_conflicts_total",
		"Nodes taken from the queue that another provisioner held or had finished (ha modes; in claims mode every provisioner queues every node, so each node counts here once per other provisioner that saw it).")))
	m.policyRejections = prometheus.NewCounterVec(prometheus.CounterOpts(opts("policy_rejections_total", "CSRs and certificates refused by the provisioner's policy, by reason.")), []string{"reason"})
	heldG := prometheus.NewGaugeFunc(prometheus.GaugeOpts(opts("held_nodes", "Nodes held for an operator's approval.")),
		func() float64 { return float64(states()[StateHeld]) })
	// muster_provisioner_nodes: every state has a series.
	byState := labelCollector[State, int]{
		desc: prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, metricsSubsystem, "nodes"),
			"Nodes this provisioner knows, by state.", []string{"state"}, nil),
		kind: prometheus.GaugeValue, labels: allStates, read: states,
	}
	intakeC := labelCollector[string, int64]{
		desc: prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, metricsSubsystem, "intake_dropped_total"),
			"Announcements and events dropped before the provisioner read them, because its intake was full (a slow consumer), by source.", []string{"source"}, nil),
		kind: prometheus.CounterValue, labels: intakeSources, read: intakeDropped,
	}
	depth := prometheus.NewGaugeFunc(prometheus.GaugeOpts(opts("queue_depth", "Nodes waiting in the queue.")), queueDepth)
	capG := prometheus.NewGauge(prometheus.GaugeOpts(opts("queue_capacity", "Size of the queue.")))
	capG.Set(float64(capacity))
	wG := prometheus.NewGauge(prometheus.GaugeOpts(opts("workers", "Configured workers.")))
	wG.Set(float64(workers))

	// Create every bounded label value so the series exist from the start.
	for _, s := range []string{sourceMetadata, sourceStartup, sourceDiscovery} {
		m.discovered.WithLabelValues(s)
	}
	for _, s := range []string{sourceMetadata, sourceStartup, sourceDiscovery, sourceProduction, sourceReply, sourceAdvisory} {
		m.invalid.WithLabelValues(s)
	}
	for _, s := range allStages {
		m.errors.WithLabelValues(string(s))
		m.claimsLost.WithLabelValues(string(s))
	}
	for _, s := range rpcStages {
		m.retries.WithLabelValues(string(s))
	}
	for _, a := range rpcActions {
		m.rpcDuration.WithLabelValues(a)
	}
	for _, r := range rejectReasons {
		m.policyRejections.WithLabelValues(r)
	}
	for _, o := range []string{helperConfigure, helperDefer, helperShutdown, helperError} {
		m.helperDur.WithLabelValues(o)
	}

	for _, c := range []prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.discovered, m.provisioned, m.deferred, m.shutdown, m.errors, m.retries, m.invalid,
		m.shed, depth, capG, wG, m.busy, m.paused, m.arrivals, m.rpcDuration, m.helperDur,
		m.queueWait, m.nodeDuration, m.clockOffset, m.tokenRefusals, m.policyRejections, heldG, m.standby, m.completedOnArrival,
		m.claimsLost, m.claimConflicts, byState, intakeC,
	} {
		if err := m.reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// labelCollector exposes one series per label value, read at scrape time:
// every value of labels has a series, 0 while read has nothing for it.
type labelCollector[K ~string, V int | int64] struct {
	desc   *prometheus.Desc
	kind   prometheus.ValueType
	labels []K
	read   func() map[K]V
}

// Describe implements prometheus.Collector.
func (c labelCollector[K, V]) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c labelCollector[K, V]) Collect(ch chan<- prometheus.Metric) {
	values := c.read()
	for _, l := range c.labels {
		ch <- prometheus.MustNewConstMetric(c.desc, c.kind, float64(values[l]), string(l))
	}
}
