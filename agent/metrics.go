package agent

import (
	"bufio"
	"io"
	"strconv"
)

// MetricsContentType is the media type of WriteMetrics's output: the
// Prometheus text exposition format, version 0.0.4.
const MetricsContentType = "text/plain; version=0.0.4; charset=utf-8"

// WriteMetrics writes the agent's counters, read now, in the Prometheus text
// exposition format: muster_agent_refused_requests_total{reason} and
// muster_agent_mode (0 provisioning, 1 production).
//
// The agent writes its two metric families itself rather than through the
// Prometheus client library: linking the library adds about a millisecond
// of package initialisation to every agent start (and a restart is a
// re-exec) and a few megabytes to a binary meant for small devices. The
// output is checked against the Prometheus parser in the tests.
func WriteMetrics(w io.Writer, a *Agent) error {
	r := a.Refusals()
	bw := bufio.NewWriter(w)
	bw.WriteString("# HELP muster_agent_refused_requests_total Requests the agent refused, by reason (unsigned, bad_signature, untrusted_key, stale, replayed).\n")
	bw.WriteString("# TYPE muster_agent_refused_requests_total counter\n")
	for _, c := range []struct {
		reason string
		n      uint64
	}{
		{"bad_signature", r.BadSignature},
		{"replayed", r.Replayed},
		{"stale", r.Stale},
		{"unsigned", r.Unsigned},
		{"untrusted_key", r.UntrustedKey},
	} {
		bw.WriteString(`muster_agent_refused_requests_total{reason="` + c.reason + `"} `)
		bw.WriteString(strconv.FormatUint(c.n, 10))
		bw.WriteByte('\n')
	}
	bw.WriteString("# HELP muster_agent_mode The agent's mode: 0 provisioning, 1 production.\n")
	bw.WriteString("# TYPE muster_agent_mode gauge\n")
	bw.WriteString("muster_agent_mode " + strconv.Itoa(int(a.Mode())) + "\n")
	return bw.Flush()
}
