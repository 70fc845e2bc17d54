package bench

import (
	"os"
	"testing"

	"github.com/muster-io/muster/internal/demo"
)

// fleetHostTestEnv makes the test binary a fleet host (see TestMain).
const fleetHostTestEnv = "MUSTER_TEST_FLEET_HOST"

// TestMain serves as the fleet host of TestRunFleetProcess when it starts
// this binary as one, and runs the tests otherwise.
func TestMain(m *testing.M) {
	if os.Getenv(fleetHostTestEnv) == "1" {
		os.Exit(demo.FleetHostMain())
	}
	os.Exit(m.Run())
}
