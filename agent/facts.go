package agent

import (
	"fmt"
	"os"
	"sort"
	"time"

	"gopkg.in/yaml.v3"
)

// maxFactsSize bounds a facts file.
const maxFactsSize = 1 << 20

// readFacts reads a JSON object or YAML map of facts. Scalar values (numbers,
// booleans) are turned into strings; nested values are an error.
func readFacts(path string) (map[string]string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if st.Size() > maxFactsSize {
		return nil, fmt.Errorf("%d bytes, limit %d", st.Size(), maxFactsSize)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseFacts(data)
}

func parseFacts(data []byte) (map[string]string, error) {
	var raw map[string]any
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("parse facts: %w", err)
	}
	out := make(map[string]string, len(raw))
	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if k == "" {
			return nil, fmt.Errorf("parse facts: empty fact name")
		}
		switch v := raw[k].(type) {
		case nil:
			out[k] = ""
		case string:
			out[k] = v
		case time.Time:
			out[k] = v.UTC().Format(time.RFC3339)
		case bool, int, int64, uint64, float64:
			out[k] = fmt.Sprint(v)
		default:
			return nil, fmt.Errorf("parse facts: fact %q is not a string", k)
		}
	}
	return out, nil
}

// currentFacts reads the facts file (errors are logged) and merges
// Options.Facts over it.
func (a *Agent) currentFacts() map[string]string {
	facts := map[string]string{}
	if a.prov.FactsFile != "" {
		f, err := readFacts(a.prov.FactsFile)
		if err != nil {
			a.log.WithError(err).Warn("facts file unusable; using the compiled-in facts only")
		}
		for k, v := range f {
			facts[k] = v
		}
	}
	for k, v := range a.facts {
		facts[k] = v
	}
	return facts
}
