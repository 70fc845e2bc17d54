package protocol

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func validRequest() *Request {
	return &Request{
		Protocol: RequestProtocol, ID: "abc123", Sender: "prov", Target: "node1.example.net",
		Agent: AgentRPCUtil, Action: ActionPing, Time: time.Now().UTC(), TTL: 60,
	}
}

func TestValidateIdentity(t *testing.T) {
	cases := []struct {
		name string
		id   string
		ok   bool
	}{
		{"fqdn", "node1.example.net", true},
		{"short", "n", true},
		{"underscore and dash", "web_01-a", true},
		{"empty", "", false},
		{"leading dot", ".node", false},
		{"trailing dot", "node.", false},
		{"double dot", "a..b", false},
		{"slash", "a/b", false},
		{"dotdot path", "../etc", false},
		{"wildcard", "a.*", false},
		{"full wildcard", ">", false},
		{"space", "a b", false},
		{"newline", "a\nb", false},
		{"too long", strings.Repeat("a", MaxIdentityLength+1), false},
		{"max length", strings.Repeat("a", MaxIdentityLength), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := ValidateIdentity(c.id)
			if (err == nil) != c.ok {
				t.Fatalf("ValidateIdentity(%q) = %v, want ok=%v", c.id, err, c.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalidIdentity) {
				t.Fatalf("error %v is not ErrInvalidIdentity", err)
			}
		})
	}
}

func TestDecodeRequest(t *testing.T) {
	good, _ := json.Marshal(validRequest())
	if _, err := DecodeRequest(good); err != nil {
		t.Fatalf("valid request: %v", err)
	}
	cases := []struct {
		name string
		data string
		want error
	}{
		{"unknown field", strings.Replace(string(good), `"id"`, `"evil":1,"id"`, 1), nil},
		{"trailing data", string(good) + "{}", nil},
		{"bad protocol", strings.Replace(string(good), RequestProtocol, "muster:request:9", 1), ErrBadProtocol},
		{"bad target", strings.Replace(string(good), "node1.example.net", "../x", 1), ErrInvalidIdentity},
		{"zero ttl", strings.Replace(string(good), `"ttl":60`, `"ttl":0`, 1), ErrBadTTL},
		{"huge ttl", strings.Replace(string(good), `"ttl":60`, `"ttl":100000`, 1), ErrBadTTL},
		{"too large", `{"id":"` + strings.Repeat("a", MaxMessageSize) + `"}`, ErrTooLarge},
		{"not json", "hello", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := DecodeRequest([]byte(c.data))
			if err == nil {
				t.Fatal("decoded, want error")
			}
			if c.want != nil && !errors.Is(err, c.want) {
				t.Fatalf("error %v, want %v", err, c.want)
			}
		})
	}
}

func TestCheckFresh(t *testing.T) {
	now := time.Now()
	r := validRequest()
	r.Time = now
	if err := r.CheckFresh(now.Add(30*time.Second), time.Second); err != nil {
		t.Fatalf("fresh request refused: %v", err)
	}
	// A refusal says what the receiver's clock read, so that a node with
	// a wrong clock is found from the sender's log.
	later := now.Add(2 * time.Minute)
	if err := r.CheckFresh(later, time.Second); !errors.Is(err, ErrExpired) || !strings.Contains(err.Error(), later.UTC().Format(time.RFC3339)) {
		t.Fatalf("stale request: %v", err)
	}
	r.Time = now.Add(time.Minute)
	if err := r.CheckFresh(now, 5*time.Second); !errors.Is(err, ErrExpired) || !strings.Contains(err.Error(), now.UTC().Format(time.RFC3339)) || !strings.Contains(err.Error(), "1m0s in the future") {
		t.Fatalf("future request: %v", err)
	}
}

func TestReplyRoundTrip(t *testing.T) {
	req := validRequest()
	rep, err := NewReply(req, "node1.example.net", CodeBadRequest, "no", PingReply{Identity: "node1.example.net"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeReply(b)
	if err != nil {
		t.Fatal(err)
	}
	var re *ReplyError
	if err := got.Err(); !errors.As(err, &re) || re.Code != CodeBadRequest {
		t.Fatalf("Err() = %v", err)
	}
	if got.ID != req.ID {
		t.Fatalf("id %q, want %q", got.ID, req.ID)
	}
}

func TestSubjects(t *testing.T) {
	if s := NodeSubject(ProvisioningCollective, "n1.example.net"); s != "provisioning.node.n1.example.net" {
		t.Fatal(s)
	}
	if s := BroadcastSubject(ProvisioningCollective, AgentDiscovery); s != "provisioning.broadcast.agent.discovery" {
		t.Fatal(s)
	}
	if s := LifecycleSubject(EventStartup, AgentComponent, "n1.example.net"); s != "choria.lifecycle.event.startup.muster-agent.n1.example.net" {
		t.Fatal(s)
	}
}

func FuzzDecodeRequest(f *testing.F) {
	good, _ := json.Marshal(validRequest())
	f.Add(good)
	f.Add([]byte(`{"protocol":"muster:request:1"}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := DecodeRequest(data)
		if err != nil {
			return
		}
		if r.Validate() != nil {
			t.Fatal("DecodeRequest returned an invalid request")
		}
		if r.Target != "" && ValidateIdentity(r.Target) != nil {
			t.Fatal("invalid target accepted")
		}
	})
}

func FuzzDecodeReply(f *testing.F) {
	rep, _ := NewReply(validRequest(), "n1", CodeOK, "", map[string]int{"a": 1})
	b, _ := json.Marshal(rep)
	f.Add(b)
	f.Add([]byte(`{"protocol":"muster:reply:1","code":"ok","sender":"../x"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := DecodeReply(data)
		if err == nil && ValidateIdentity(r.Sender) != nil {
			t.Fatal("reply with invalid sender accepted")
		}
	})
}

func TestDecodeEventSerial(t *testing.T) {
	for _, tc := range []struct {
		serial string
		ok     bool
	}{
		{"", true},
		{"1f0a9c", true},
		{strings.Repeat("f", MaxSerialHex), true},
		{strings.Repeat("f", MaxSerialHex+1), false},
		{"1F0A", false},
		{"12 34", false},
		{"-1", false},
	} {
		data, _ := json.Marshal(Event{Protocol: EventProtocol, ID: "e1", Identity: "n1", Type: EventProvisioned, Component: AgentComponent, Serial: tc.serial})
		ev, err := DecodeEvent(data)
		if tc.ok != (err == nil) {
			t.Errorf("serial %q: %v", tc.serial, err)
			continue
		}
		if err == nil && ev.Serial != tc.serial {
			t.Errorf("serial %q decoded as %q", tc.serial, ev.Serial)
		}
		if err != nil && !errors.Is(err, ErrBadField) {
			t.Errorf("serial %q: %v, want ErrBadField", tc.serial, err)
		}
	}
}

// TestMetadataStarted: a life's start comes with its announcements, and
// cannot be after them.
func TestMetadataStarted(t *testing.T) {
	now := time.Date(2026, 12, 1, 22, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name    string
		started time.Time
		ok      bool
	}{
		{"not sent", time.Time{}, true},
		{"before", now.Add(-time.Hour), true},
		{"at the announcement", now, true},
		{"after the announcement", now.Add(time.Second), false},
	} {
		b, _ := json.Marshal(Metadata{Protocol: MetadataProto, Identity: "n1", Time: now, Started: tc.started})
		md, err := DecodeMetadata(b)
		if tc.ok && (err != nil || !md.Started.Equal(tc.started)) || !tc.ok && !errors.Is(err, ErrBadField) {
			t.Errorf("%s: %+v, %v", tc.name, md, err)
		}
	}
	// Omitted when zero (Choria's consumers see the metadata they know).
	b, _ := json.Marshal(Metadata{Protocol: MetadataProto, Identity: "n1", Time: now})
	if strings.Contains(string(b), "started") {
		t.Errorf("zero start encoded: %s", b)
	}
}

// TestLife: life IDs are new each time, and only well-formed ones (or none)
// pass the decoders.
func TestLife(t *testing.T) {
	a, b := NewLife(), NewLife()
	if !ValidLife(a) || len(a) != LifeLen || a == b {
		t.Fatalf("NewLife gave %q and %q", a, b)
	}
	now := time.Date(2026, 12, 2, 1, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		life string
		ok   bool
	}{
		{"", true},
		{a, true},
		{strings.ToUpper(a), false},
		{a[:LifeLen-1], false},
		{a + "0", false},
		{strings.Repeat("g", LifeLen), false},
		{"../" + a[3:], false},
	} {
		m, _ := json.Marshal(Metadata{Protocol: MetadataProto, Identity: "n1", Time: now, Life: tc.life})
		e, _ := json.Marshal(Event{Protocol: EventProtocol, Identity: "n1", Type: EventStartup, Component: AgentComponent, Time: now, Life: tc.life})
		md, merr := DecodeMetadata(m)
		ev, eerr := DecodeEvent(e)
		if tc.ok && (merr != nil || eerr != nil || md.Life != tc.life || ev.Life != tc.life) ||
			!tc.ok && (!errors.Is(merr, ErrBadField) || !errors.Is(eerr, ErrBadField)) || ValidLife(tc.life) != tc.ok {
			t.Errorf("life %q: metadata %v, event %v", tc.life, merr, eerr)
		}
	}
	// Omitted when empty.
	m, _ := json.Marshal(Metadata{Protocol: MetadataProto, Identity: "n1", Time: now})
	if strings.Contains(string(m), "life") {
		t.Errorf("empty life encoded: %s", m)
	}
}

func FuzzDecodeMetadataEvent(f *testing.F) {
	m, _ := json.Marshal(Metadata{Protocol: MetadataProto, Identity: "n1", Facts: map[string]string{"a": "b"}})
	e, _ := json.Marshal(Event{Protocol: EventProtocol, Identity: "n1", Type: EventStartup, Component: AgentComponent, Life: NewLife()})
	p, _ := json.Marshal(Event{Protocol: EventProtocol, Identity: "n1", Type: EventProvisioned, Component: AgentComponent, Serial: "1f0a"})
	now := time.Date(2026, 12, 1, 22, 0, 0, 0, time.UTC)
	s, _ := json.Marshal(Metadata{Protocol: MetadataProto, Identity: "n1", Time: now, Started: now.Add(-time.Minute), Life: NewLife()})
	f.Add(m)
	f.Add(e)
	f.Add(p)
	f.Add(s)
	f.Fuzz(func(t *testing.T, data []byte) {
		if md, err := DecodeMetadata(data); err == nil && (ValidateIdentity(md.Identity) != nil || md.Started.After(md.Time) || !ValidLife(md.Life)) {
			t.Fatal("invalid metadata accepted")
		}
		if ev, err := DecodeEvent(data); err == nil && (ValidateIdentity(ev.Identity) != nil || ev.Type == "" || !ValidSerial(ev.Serial) || !ValidLife(ev.Life)) {
			t.Fatal("invalid event accepted")
		}
	})
}

func FuzzValidateIdentity(f *testing.F) {
	f.Add("node1.example.net")
	f.Add("../../etc/passwd")
	f.Fuzz(func(t *testing.T, id string) {
		if ValidateIdentity(id) != nil {
			return
		}
		if strings.ContainsAny(id, "/\\ \n\r\t*>") || strings.Contains(id, "..") || len(id) > MaxIdentityLength {
			t.Fatalf("identity %q accepted", id)
		}
	})
}

// FuzzDecodeFrom feeds arbitrary subjects and bodies to the decoders of
// metadata and lifecycle events: what they accept names the identity its
// subject ends in.
func FuzzDecodeFrom(f *testing.F) {
	m, _ := json.Marshal(Metadata{Protocol: MetadataProto, Identity: "n1.example.net", Facts: map[string]string{"a": "b"}})
	e, _ := json.Marshal(Event{Protocol: EventProtocol, Identity: "n1.example.net", Type: EventStartup, Component: AgentComponent})
	f.Add(MetadataSubjectFor("n1.example.net"), m)
	f.Add(LifecycleSubject(EventStartup, AgentComponent, "n1.example.net"), e)
	f.Add(LifecycleSubject(EventStartup, AgentComponent, "x.n1.example.net"), e)
	f.Add(MetadataSubject, m)
	f.Fuzz(func(t *testing.T, subject string, data []byte) {
		if md, err := DecodeMetadataFrom(subject, data); err == nil && subject != MetadataSubjectFor(md.Identity) {
			t.Fatalf("metadata of %q accepted on %q", md.Identity, subject)
		}
		if ev, err := DecodeEventFrom(subject, data); err == nil && subject != LifecycleSubject(ev.Type, ev.Component, ev.Identity) {
			t.Fatalf("event of %q (%s %s) accepted on %q", ev.Identity, ev.Type, ev.Component, subject)
		}
	})
}
