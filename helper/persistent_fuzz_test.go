package helper

import (
	"errors"
	"testing"
)

// FuzzAttributeReply feeds arbitrary stdout lines of a persistent helper
// (persistent line mode): a line is either a reply for one request, an
// error for one request, or an error that restarts the helper; never a
// panic, and never a reply without its request's id.
func FuzzAttributeReply(f *testing.F) {
	f.Add([]byte(`{"request_id":"r1","defer":true,"msg":"later"}`))
	f.Add([]byte(`{"request_id":"r2","configuration":{"a":1}}`))
	f.Add([]byte(`{"defer":true}`))
	f.Add([]byte(`{"request_id":"r3","error":"CA down"}`))
	f.Add([]byte(`not json`))
	f.Add([]byte(`{"request_id":"r4"} {"request_id":"r5"}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		id, rep, err := attributeReply(line)
		switch {
		case err == nil && (rep == nil || id == "" || rep.RequestID != id):
			t.Fatalf("accepted %q as reply %+v for %q", line, rep, id)
		case err != nil && rep != nil:
			t.Fatalf("reply and error for %q", line)
		case err != nil && !errors.Is(err, ErrInvalidReply) && !errors.Is(err, ErrBadJSON) && !errors.Is(err, ErrEmpty):
			t.Fatalf("error of unknown kind: %v", err)
		}
	})
}
