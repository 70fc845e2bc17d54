package bench

import (
	"errors"
	"math"

	dto "github.com/prometheus/client_model/go"

	"github.com/muster-io/muster/provisioner"
)

// Provisioner metric names the bench reads.
const (
	metricQueueWait = "muster_provisioner_queue_wait_seconds"
	metricRPC       = "muster_provisioner_rpc_duration_seconds"
	metricErrors    = "muster_provisioner_errors_total"
	metricRetries   = "muster_provisioner_retries_total"
	metricProvCount = "muster_provisioner_provisioned_total"
	metricLost      = "muster_provisioner_claims_lost_total"
	metricConflicts = "muster_provisioner_claim_conflicts_total"
	metricShed      = "muster_provisioner_queue_shed_total"
	metricIntake    = "muster_provisioner_intake_dropped_total"
)

// bucket is one cumulative histogram bucket.
type bucket struct {
	upper float64
	count uint64
}

// histogram is one histogram series.
type histogram struct {
	count   uint64
	sum     float64
	buckets []bucket
}

// provMetrics is what the bench takes from the provisioner's registry.
type provMetrics struct {
	// hist is keyed by metric name, then by the series' label value
	// ("" for unlabelled histograms).
	hist    map[string]map[string]histogram
	errors  map[string]float64
	retries map[string]float64
	// provisioned is each provisioner's provisioned_total, in order.
	provisioned    []int
	claimsLost     map[string]float64
	claimConflicts float64
	shed           float64
	intakeDropped  map[string]float64
}

// gatherMetrics reads the provisioners' registries and adds their series
// up (several provisioners in the ha modes; their histograms share one
// bucket layout).
func gatherMetrics(provs ...*provisioner.Provisioner) (*provMetrics, error) {
	m := &provMetrics{hist: map[string]map[string]histogram{}, errors: map[string]float64{}, retries: map[string]float64{}, claimsLost: map[string]float64{}, intakeDropped: map[string]float64{}}
	if len(provs) == 0 {
		return m, errors.New("no provisioner")
	}
	for i, p := range provs {
		families, err := p.Registry().Gather()
		if err != nil {
			return m, err
		}
		m.provisioned = append(m.provisioned, 0)
		for _, mf := range families {
			name := mf.GetName()
			for _, s := range mf.GetMetric() {
				label := ""
				if ls := s.GetLabel(); len(ls) > 0 {
					label = ls[0].GetValue()
				}
				switch name {
				case metricQueueWait, metricRPC:
					if m.hist[name] == nil {
						m.hist[name] = map[string]histogram{}
					}
					m.hist[name][label] = m.hist[name][label].add(s.GetHistogram())
				case metricErrors:
					m.errors[label] += s.GetCounter().GetValue()
				case metricRetries:
					m.retries[label] += s.GetCounter().GetValue()
				case metricProvCount:
					m.provisioned[i] += int(s.GetCounter().GetValue())
				case metricLost:
					m.claimsLost[label] += s.GetCounter().GetValue()
				case metricConflicts:
					m.claimConflicts += s.GetCounter().GetValue()
				case metricShed:
					m.shed += s.GetCounter().GetValue()
				case metricIntake:
					m.intakeDropped[label] += s.GetCounter().GetValue()
				}
			}
		}
	}
	return m, nil
}

// add returns h with the series of h2 added: counts and sums, bucket by
// bucket.
func (h histogram) add(h2 *dto.Histogram) histogram {
	out := histogram{count: h.count + h2.GetSampleCount(), sum: h.sum + h2.GetSampleSum()}
	for i, b := range h2.GetBucket() {
		nb := bucket{upper: b.GetUpperBound(), count: b.GetCumulativeCount()}
		if i < len(h.buckets) {
			nb.count += h.buckets[i].count
		}
		out.buckets = append(out.buckets, nb)
	}
	return out
}

// stage summarises one histogram series as a StageLatency.
func (m *provMetrics) stage(stage, metric, label string) StageLatency {
	st := StageLatency{Stage: stage, Source: "histogram", Metric: metric}
	if label != "" {
		st.Metric += `{action="` + label + `"}`
	}
	h, ok := m.hist[metric][label]
	if !ok || h.count == 0 {
		return st
	}
	st.Count = h.count
	st.MeanMS = h.sum / float64(h.count) * 1000
	st.P95MS = h.quantile(0.95) * 1000
	return st
}

// quantile estimates the q quantile by linear interpolation inside the
// bucket that holds it. A quantile in the +Inf bucket is reported as the
// largest finite bound (a lower bound of the true value).
func (h histogram) quantile(q float64) float64 {
	if h.count == 0 {
		return 0
	}
	rank := q * float64(h.count)
	lower, below := 0.0, uint64(0)
	for _, b := range h.buckets {
		if float64(b.count) >= rank {
			if math.IsInf(b.upper, 1) {
				return lower
			}
			in := b.count - below
			if in == 0 {
				return b.upper
			}
			return lower + (b.upper-lower)*(rank-float64(below))/float64(in)
		}
		lower, below = b.upper, b.count
	}
	return lower
}
