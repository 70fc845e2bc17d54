// Package faulttest holds Muster's fault tests (issue 5, "Done when"): a
// three-broker cluster of real `muster broker` processes, two or three real
// `muster provisioner` processes in claims mode and a storm of at least a
// thousand simulated nodes (real agent code in a fleetsim process, and
// real muster-agent processes where a test kills agents), with one fault
// injected mid-storm: a broker killed, a provisioner killed, the whole
// provisioner set restarted, a helper that hangs, crashes or prints
// garbage, agents killed in the middle of configure. Every test ends by
// checking that each node was provisioned exactly once (from the nodes'
// lifecycle events and from the shared node state), that no state
// directory holds a torn or temporary file, and reports the failover time
// it measured. docs/ha.md describes the suite and its figures.
//
// The package has no code of its own outside tests; the simulator and the
// fault-injecting helper are the commands in fleetsim/ and faulthelper/,
// built with muster and muster-agent by the first test that needs them.
package faulttest
