package builtin

import (
	"errors"
	"fmt"
	"strings"
)

// errMissingFact is returned by render when a {{fact:NAME}} placeholder
// names a fact the node does not have.
var errMissingFact = errors.New("missing fact")

// templateVars are the values placeholders expand to.
type templateVars struct {
	identity string
	ssldir   string
	facts    map[string]string
}

// checkTemplate reports a malformed or unknown placeholder.
func checkTemplate(s string) error {
	_, err := render(s, nil)
	return err
}

// render expands {{identity}}, {{ssldir}} and {{fact:NAME}} in s. With nil
// vars it only checks the syntax.
func render(s string, v *templateVars) (string, error) {
	var b strings.Builder
	rest := s
	for {
		i := strings.Index(rest, "{{")
		if i < 0 {
			if strings.Contains(rest, "}}") {
				return "", errors.New("unbalanced }}")
			}
			b.WriteString(rest)
			return b.String(), nil
		}
		if strings.Contains(rest[:i], "}}") {
			return "", errors.New("unbalanced }}")
		}
		b.WriteString(rest[:i])
		rest = rest[i+2:]
		j := strings.Index(rest, "}}")
		if j < 0 {
			return "", errors.New("unterminated {{")
		}
		name := strings.TrimSpace(rest[:j])
		rest = rest[j+2:]
		switch {
		case name == "identity":
			if v != nil {
				b.WriteString(v.identity)
			}
		case name == "ssldir":
			if v != nil {
				b.WriteString(v.ssldir)
			}
		case strings.HasPrefix(name, "fact:"):
			fact := strings.TrimSpace(strings.TrimPrefix(name, "fact:"))
			if fact == "" {
				return "", errors.New("empty fact name in {{fact:}}")
			}
			if v != nil {
				val, ok := v.facts[fact]
				if !ok {
					return "", fmt.Errorf("%w %q", errMissingFact, fact)
				}
				b.WriteString(val)
			}
		default:
			return "", fmt.Errorf("unknown placeholder {{%s}} (want identity, ssldir or fact:NAME)", name)
		}
	}
}
